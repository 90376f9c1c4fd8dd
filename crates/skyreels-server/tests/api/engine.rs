//! The engine's conformance suite: the same tests, written once, run against both backends (the
//! Redis one against a real `redis-server`), as apalis' `generic_storage_test!` does for its
//! storages. They drive the engine and a worker's consumer directly: admission and the queue
//! bound, positions, cancel of a queued and of a running task, delete of a finished one,
//! progress, an outcome written once, uploads and tickets, retention, restart recovery, the
//! queue's priorities and deadlines (`queue`); and for Redis the take-over of a dead worker's
//! task.

mod queue;

use crate::common::{text_params, RedisServer};
use queue::{
    a_running_task_is_cancelled_at_its_deadline, a_task_past_its_deadline_never_starts,
    low_tasks_start_after_normal_ones,
};
use skyreels_params::GenerationDefaults;
use skyreels_server::backend::memory::Memory;
use skyreels_server::backend::redis::{ClusterConfig, Redis};
use skyreels_server::engine::files::Paths;
use skyreels_server::engine::task::{JobRecord, Outcome, Status, TaskCode};
use skyreels_server::engine::{
    AdmitError, Backend, Blob, CancelResult, Consumer, Engine, Hook, Lease, ModelInfo, Queued,
    Upload, UploadRefused, Verdict, MAX_OPEN_TICKETS_PER_KEY,
};
use skyreels_server::metrics::Metrics;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const MODEL: &str = "test/model";
/// The queue bound of every fixture.
const MAX_QUEUE: usize = 3;

/// Where a fixture's engine keeps its tasks.
enum Store {
    Memory,
    Redis(RedisServer),
}

struct Fixture {
    engine: Engine,
    finished: UnboundedReceiver<JobRecord>,
    dir: tempfile::TempDir,
    store: Store,
    retention: Option<Duration>,
}

fn model() -> ModelInfo {
    ModelInfo {
        id: MODEL.into(),
        image_to_video: false,
        defaults: GenerationDefaults::default(),
        size_multiple: 16,
        max_pixel_frames: u64::MAX,
        ulysses: None,
        temporal_rope_frequencies: skyreels_params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES,
        safety_checker: None,
    }
}

fn open(
    store: &Store,
    dir: &Path,
    retention: Option<Duration>,
) -> (Engine, UnboundedReceiver<JobRecord>) {
    let metrics = Arc::<Metrics>::default();
    let (hook, finished) = Hook::new(metrics.clone());
    let backend: Box<dyn Backend> = match store {
        Store::Memory => Box::new(Memory::open(dir, retention, hook).unwrap()),
        Store::Redis(r) => {
            let config = ClusterConfig {
                // a dead worker's task is taken over quickly
                claim_timeout: Duration::from_millis(300),
                ..ClusterConfig::new(r.url())
            };
            let paths = Paths::create(dir).unwrap();
            Box::new(Redis::open(config, paths, retention, hook).unwrap())
        }
    };
    (Engine::new(backend, MAX_QUEUE, metrics), finished)
}

impl Fixture {
    fn new(redis: bool, retention: Option<Duration>) -> Self {
        let store = if redis {
            Store::Redis(RedisServer::start())
        } else {
            Store::Memory
        };
        Self::open(store, tempfile::tempdir().unwrap(), retention)
    }

    /// An engine on `store` over the folder `dir`.
    fn open(store: Store, dir: tempfile::TempDir, retention: Option<Duration>) -> Self {
        let (engine, finished) = open(&store, dir.path(), retention);
        Fixture {
            engine,
            finished,
            dir,
            store,
            retention,
        }
    }

    /// The engine of a restarted process: the same folder, the same Redis.
    async fn reopen(self) -> Self {
        self.engine.flushed().await;
        let Fixture {
            engine,
            dir,
            store,
            retention,
            ..
        } = self;
        drop(engine);
        Self::open(store, dir, retention)
    }

    fn consumer(&self) -> Box<dyn Consumer> {
        self.engine.consumer(&[model()], 0)
    }

    /// A created task, admitted.
    async fn admit(&self) -> JobRecord {
        let r = JobRecord::created(MODEL, serde_json::Value::Null, "http://x".into(), 1, 4);
        self.engine.admit(r.clone()).await.unwrap();
        r
    }

    /// A task admitted and queued (text to video, no image).
    async fn queued(&self) -> JobRecord {
        let r = self.admit().await;
        let queued = Queued {
            params: text_params(),
            image: None,
        };
        self.engine.enqueue(&r.id, MODEL, queued).await;
        r
    }

    async fn status(&self, id: &str) -> Option<(Status, Option<usize>)> {
        let got = self.engine.get(id).await.unwrap();
        got.map(|(r, pos)| (r.status, pos))
    }

    /// The next finished record told to the hook.
    async fn next_finished(&mut self) -> JobRecord {
        tokio::time::timeout(Duration::from_secs(5), self.finished.recv())
            .await
            .expect("a finished task is told")
            .unwrap()
    }
}

/// Takes the next task within a few seconds (a worker's take waits about a second each time).
async fn take(consumer: &mut Box<dyn Consumer>) -> Lease {
    let start = Instant::now();
    loop {
        if let Some(lease) = tokio::task::block_in_place(|| consumer.take()).unwrap() {
            return lease;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no task came");
    }
}

/// A completed outcome whose video (`bytes`) is where a worker writes it.
fn completed(f: &Fixture, lease: &Lease, bytes: &[u8]) -> (Outcome, std::path::PathBuf) {
    let file = format!("{}.mp4", lease.id);
    let video = f.engine.paths().video_path(&file);
    std::fs::write(&video, bytes).unwrap();
    let outcome = Outcome::Completed {
        output: file,
        timings: vec![("denoising".into(), 5)],
        counts: vec![],
        nsfw: None,
    };
    (outcome, video)
}

async fn admission_is_bounded_and_positions_follow_the_queue(mut f: Fixture) {
    let tasks = [f.admit().await, f.admit().await, f.admit().await];
    for (i, t) in tasks.iter().enumerate() {
        assert_eq!(f.status(&t.id).await, Some((Status::Created, Some(i))));
    }
    let extra = JobRecord::created(MODEL, serde_json::Value::Null, "http://x".into(), 1, 4);
    assert!(matches!(
        f.engine.admit(extra).await,
        Err(AdmitError::QueueFull)
    ));
    // a queued task cancelled: off the queue, the one behind it moves up, the hook is told
    let got = f.engine.cancel_or_delete(&tasks[1].id).await.unwrap();
    assert_eq!(got, Some(CancelResult::Dequeued));
    assert_eq!(
        f.status(&tasks[1].id).await,
        Some((Status::Cancelled, None))
    );
    assert_eq!(
        f.status(&tasks[2].id).await,
        Some((Status::Created, Some(1)))
    );
    let told = f.next_finished().await;
    assert_eq!(
        (told.id.as_str(), told.status),
        (tasks[1].id.as_str(), Status::Cancelled)
    );
    // a task failed before it started (its image did not load)
    f.engine
        .fail_unstarted(&tasks[0].id, TaskCode::MediaAccessFailed, "gone".into())
        .await;
    let (r, _) = f.engine.get(&tasks[0].id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.code),
        (Status::Failed, TaskCode::MediaAccessFailed)
    );
    // and room again
    f.admit().await;
    assert!(f.engine.get("no-such-task").await.unwrap().is_none());
    assert_eq!(
        f.engine.cancel_or_delete("no-such-task").await.unwrap(),
        None
    );
}

async fn a_task_runs_reports_progress_and_ends_once(mut f: Fixture) {
    let t = f.queued().await;
    let mut worker = f.consumer();
    let lease = take(&mut worker).await;
    assert_eq!((lease.id.as_str(), lease.attempt), (t.id.as_str(), 1));
    let input = lease.input.as_ref().expect("the queued input");
    assert_eq!((input.params.width, input.params.steps), (96, 4));
    assert_eq!(worker.progress(&lease, 2, 4), Verdict::GoOn);
    let (r, pos) = f.engine.get(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.step, r.total_steps, pos),
        (Status::Processing, 2, 4, None)
    );
    let (outcome, video) = completed(&f, &lease, b"mp4 bytes");
    assert!(
        worker.finish(&lease, &outcome, &video).unwrap(),
        "the first outcome wins"
    );
    let failed = Outcome::Failed(TaskCode::Internal, "late".into());
    assert!(
        !worker.finish(&lease, &failed, &video).unwrap(),
        "written once"
    );
    let (r, _) = f.engine.get(&t.id).await.unwrap().unwrap();
    assert_eq!(r.status, Status::Completed);
    assert_eq!((r.step, r.attempts), (4, 1));
    assert_eq!(r.outputs, [format!("{}.mp4", t.id)]);
    assert_eq!(f.next_finished().await.status, Status::Completed);
    let content = f.engine.content(Blob::Output(&r.outputs[0])).await.unwrap();
    assert_eq!(content.unwrap().read_all().await.unwrap(), b"mp4 bytes");
    assert!(f.engine.wait_finished(&t.id, Duration::from_secs(1)).await);
}

async fn cancel_stops_a_running_task_and_delete_removes_a_finished_one(mut f: Fixture) {
    let t = f.queued().await;
    let mut worker = f.consumer();
    let lease = take(&mut worker).await;
    let got = f.engine.cancel_or_delete(&t.id).await.unwrap();
    assert_eq!(got, Some(CancelResult::Cancelling));
    assert_eq!(worker.progress(&lease, 1, 4), Verdict::CancelAsked);
    let video = f.engine.paths().video_path("unused.mp4");
    assert!(worker.finish(&lease, &Outcome::Cancelled, &video).unwrap());
    assert_eq!(f.next_finished().await.status, Status::Cancelled);
    // a finished task: deleted with its files
    let t = f.queued().await;
    let lease = take(&mut worker).await;
    let (outcome, video) = completed(&f, &lease, b"video");
    assert!(worker.finish(&lease, &outcome, &video).unwrap());
    let file = format!("{}.mp4", t.id);
    let got = f.engine.cancel_or_delete(&t.id).await.unwrap();
    assert_eq!(got, Some(CancelResult::Deleted));
    let (r, _) = f.engine.get(&t.id).await.unwrap().unwrap();
    assert_eq!((r.status, r.outputs.len()), (Status::Deleted, 0));
    assert!(f
        .engine
        .content(Blob::Output(&file))
        .await
        .unwrap()
        .is_none());
    if f.engine.outputs_on_disk() {
        assert!(!video.exists());
    }
    let got = f.engine.cancel_or_delete(&t.id).await.unwrap();
    assert_eq!(got, Some(CancelResult::AlreadyDeleted));
}

async fn uploads_and_tickets(f: Fixture) {
    let upload = Upload::new("../a b.png", "image/png", 3, "http://x");
    assert_eq!(upload.filename, "a_b.png");
    std::fs::write(f.engine.paths().upload_data_path(&upload.id), b"png").unwrap();
    let stored = f.engine.complete_upload(upload.clone()).await.unwrap();
    assert!(stored.complete);
    let got = f.engine.upload(&upload.id).await.unwrap().unwrap();
    assert_eq!((got.size, got.complete), (3, true));
    let bytes = f.engine.upload_bytes(&upload.id).await.unwrap();
    assert_eq!(bytes.as_deref(), Some(&b"png"[..]));
    assert!(f.engine.upload("no-such-upload").await.unwrap().is_none());
    // tickets: bounded per owner, single use, their uploads not complete until sent
    let open = |owner: &'static str| {
        let e = &f.engine;
        async move {
            e.open_ticket("a.png", "image/png", 10, "http://x", owner)
                .await
        }
    };
    let mut tokens = vec![];
    for _ in 0..MAX_OPEN_TICKETS_PER_KEY {
        tokens.push(open("k").await.expect("below the bound").1);
    }
    assert!(matches!(open("k").await, Err(UploadRefused::KeyTickets)));
    let (ticket, other) = open("another").await.expect("another key");
    assert!(f.engine.upload(&ticket.id).await.unwrap().is_none());
    let taken = f.engine.take_ticket(&other).await.unwrap().unwrap();
    assert_eq!((taken.id, taken.owner), (ticket.id, "another".to_string()));
    assert!(f.engine.take_ticket(&other).await.unwrap().is_none());
    // a used ticket frees its place
    assert!(f.engine.take_ticket(&tokens[0]).await.unwrap().is_some());
    assert!(open("k").await.is_ok());
}

async fn finished_tasks_expire_after_the_retention(f: Fixture) {
    let t = f.admit().await;
    f.engine
        .fail_unstarted(&t.id, TaskCode::MediaAccessFailed, "gone".into())
        .await;
    let keep = f.admit().await;
    // a worker announces the model (a shared store fails what waits for a model none serves)
    let mut worker = f.consumer();
    assert!(tokio::task::block_in_place(|| worker.take())
        .unwrap()
        .is_none());
    tokio::time::sleep(f.retention.unwrap() * 3).await;
    f.engine.sweep(Duration::from_secs(600)).await.unwrap();
    assert!(f.engine.get(&t.id).await.unwrap().is_none(), "expired");
    assert_eq!(f.status(&keep.id).await.map(|s| s.0), Some(Status::Created));
}

async fn a_restart_keeps_what_finished(f: Fixture) {
    let waiting = f.queued().await;
    let done = f.queued().await;
    let mut worker = f.consumer();
    // the first queued runs first
    let lease = take(&mut worker).await;
    assert_eq!(lease.id, waiting.id);
    let (outcome, video) = completed(&f, &lease, b"kept");
    assert!(worker.finish(&lease, &outcome, &video).unwrap());
    drop(worker);
    let shared = f.engine.is_shared();
    let f = f.reopen().await;
    let (r, _) = f.engine.get(&waiting.id).await.unwrap().unwrap();
    assert_eq!(r.status, Status::Completed);
    let content = f.engine.content(Blob::Output(&r.outputs[0])).await.unwrap();
    assert_eq!(content.unwrap().read_all().await.unwrap(), b"kept");
    let (r, _) = f.engine.get(&done.id).await.unwrap().unwrap();
    if shared {
        // other workers take it
        assert_eq!(r.status, Status::Created);
    } else {
        // its queue ended with the process
        assert_eq!((r.status, r.code), (Status::Failed, TaskCode::Unavailable));
    }
}

/// The conformance tests, once per backend (a module each).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        conformance!(@backend memory, false, $($name),*);
        conformance!(@backend redis, true, $($name),*);
    };
    (@backend $module:ident, $redis:expr, $($name:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name(super::Fixture::new($redis, None)).await;
                }
            )*
            #[tokio::test(flavor = "multi_thread")]
            async fn finished_tasks_expire_after_the_retention() {
                let f = super::Fixture::new($redis, Some(super::Duration::from_millis(300)));
                super::finished_tasks_expire_after_the_retention(f).await;
            }
        }
    };
}

conformance!(
    admission_is_bounded_and_positions_follow_the_queue,
    a_task_runs_reports_progress_and_ends_once,
    cancel_stops_a_running_task_and_delete_removes_a_finished_one,
    uploads_and_tickets,
    a_restart_keeps_what_finished,
    low_tasks_start_after_normal_ones,
    a_task_past_its_deadline_never_starts,
    a_running_task_is_cancelled_at_its_deadline,
);

/// Redis: the task of a worker that died (its heartbeat stopped) is taken over after the claim
/// timeout as attempt 2; the worker that lost it is told so at its next step.
#[tokio::test(flavor = "multi_thread")]
async fn redis_takes_over_a_dead_workers_task() {
    let f = Fixture::new(true, None);
    let t = f.queued().await;
    let mut first = f.consumer();
    let lease = take(&mut first).await;
    assert_eq!(lease.attempt, 1);
    // the first worker dies: its heartbeat stops with it
    drop(first);
    let mut second = f.consumer();
    let start = Instant::now();
    let taken = take(&mut second).await;
    assert_eq!((taken.id.as_str(), taken.attempt), (t.id.as_str(), 2));
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "after the claim timeout"
    );
    // a third worker holding the old lease has lost it
    let mut third = f.consumer();
    assert_eq!(third.progress(&lease, 1, 4), Verdict::Lost);
    let (outcome, video) = completed(&f, &taken, b"second");
    assert!(second.finish(&taken, &outcome, &video).unwrap());
    let (r, _) = f.engine.get(&t.id).await.unwrap().unwrap();
    assert_eq!((r.status, r.attempts), (Status::Completed, 2));
}
