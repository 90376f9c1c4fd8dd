//! The queue's order and deadlines, in the conformance suite (both backends): low tasks wait
//! behind normal ones (positions, the bound, the take order), a task past its deadline never
//! starts (the sweep, the take), and a running one is stopped at its deadline by the worker.

use super::{completed, model, take, Fixture, MODEL};
use crate::common::text_params;
use skyreels_server::engine::task::{now_ms, JobRecord, Status, TaskCode};
use skyreels_server::engine::worker::{self, WorkerLimits};
use skyreels_server::engine::{AdmitError, Priority, Queued};
use skyreels_server::generator::{GenerateFailure, Generated, Generator, Input, ModelInfo};
use skyreels_server::loras::{LoraConfig, Loras};
use std::path::Path;
use std::time::Duration;

impl Fixture {
    /// A created task of `priority` and deadline `cancel_at`, admitted.
    async fn admit_with(&self, priority: Priority, cancel_at: Option<u64>) -> JobRecord {
        let r = JobRecord {
            priority,
            cancel_at,
            ..JobRecord::created(MODEL, serde_json::Value::Null, "http://x".into(), 1, 4)
        };
        self.engine.admit(r.clone()).await.map(|()| r).unwrap()
    }

    /// Its input is ready (text to video, no image).
    async fn enqueue(&self, r: &JobRecord) {
        let queued = Queued {
            params: text_params(),
            image: None,
        };
        self.engine.enqueue(&r.id, MODEL, queued).await;
    }
}

pub(super) async fn low_tasks_start_after_normal_ones(f: Fixture) {
    let low = f.admit_with(Priority::Low, None).await;
    let low2 = f.admit_with(Priority::Low, None).await;
    let normal = f.admit_with(Priority::Normal, None).await;
    // admitted after the low ones, the normal task is ahead of them
    for (t, at) in [(&normal, 0), (&low, 1), (&low2, 2)] {
        assert_eq!(f.status(&t.id).await, Some((Status::Created, Some(at))));
    }
    // the bound counts both
    let extra = JobRecord {
        priority: Priority::Low,
        ..JobRecord::created(MODEL, serde_json::Value::Null, "http://x".into(), 1, 4)
    };
    assert!(matches!(
        f.engine.admit(extra).await,
        Err(AdmitError::QueueFull)
    ));
    // the low tasks ready first, the normal one last: the normal one starts first
    for t in [&low, &low2, &normal] {
        f.enqueue(t).await;
    }
    let mut worker = f.consumer();
    let first = take(&mut worker).await;
    assert_eq!(
        (first.id.as_str(), first.priority),
        (normal.id.as_str(), Priority::Normal)
    );
    let (outcome, video) = completed(&f, &first, b"normal");
    assert!(worker.finish(&first, &outcome, &video).unwrap());
    assert_eq!(f.status(&low.id).await, Some((Status::Created, Some(0))));
    // a normal task admitted while low ones are ready goes ahead of them, and starts first
    let late_normal = f.admit_with(Priority::Normal, None).await;
    assert_eq!(
        f.status(&late_normal.id).await,
        Some((Status::Created, Some(0)))
    );
    assert_eq!(f.status(&low2.id).await, Some((Status::Created, Some(2))));
    f.enqueue(&late_normal).await;
    for (want, priority) in [
        (&late_normal, Priority::Normal),
        (&low, Priority::Low),
        (&low2, Priority::Low),
    ] {
        let lease = take(&mut worker).await;
        assert_eq!(
            (lease.id.as_str(), lease.priority),
            (want.id.as_str(), priority)
        );
        let (outcome, video) = completed(&f, &lease, b"video");
        assert!(worker.finish(&lease, &outcome, &video).unwrap());
        let (r, _) = f.engine.get(&want.id).await.unwrap().unwrap();
        assert_eq!((r.status, r.priority), (Status::Completed, priority));
    }
}

pub(super) async fn a_task_past_its_deadline_never_starts(mut f: Fixture) {
    // a worker announces the model (a shared store fails what waits for a model none serves)
    let mut worker = f.consumer();
    assert!(tokio::task::block_in_place(|| worker.take())
        .unwrap()
        .is_none());
    let past = Some(now_ms() - 1);
    let later = Some(now_ms() + 3_600_000);
    // the take: a queued task past its deadline is failed, the next one taken
    let late = f.admit_with(Priority::Normal, past).await;
    let on_time = f.admit_with(Priority::Normal, later).await;
    f.enqueue(&late).await;
    f.enqueue(&on_time).await;
    let lease = take(&mut worker).await;
    assert_eq!(
        (lease.id.as_str(), lease.cancel_at),
        (on_time.id.as_str(), later)
    );
    let told = f.next_finished().await;
    assert_eq!(
        (told.id.as_str(), told.status, told.code),
        (late.id.as_str(), Status::Failed, TaskCode::DeadlinePassed)
    );
    let (r, pos) = f.engine.get(&late.id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.code, pos, r.attempts, r.started_at),
        (Status::Failed, TaskCode::DeadlinePassed, None, 0, None)
    );
    assert!(
        r.error.contains("did not start before its deadline"),
        "{}",
        r.error
    );
    let (outcome, video) = completed(&f, &lease, b"on time");
    assert!(worker.finish(&lease, &outcome, &video).unwrap());
    assert_eq!(f.next_finished().await.status, Status::Completed);
    // the sweep: a waiting task past its deadline (its input not even ready) fails
    let swept = f.admit_with(Priority::Low, past).await;
    let waits = f.admit_with(Priority::Low, None).await;
    assert_eq!(f.engine.sweep(Duration::from_secs(600)).await.unwrap(), 1);
    let (r, pos) = f.engine.get(&swept.id).await.unwrap().unwrap();
    assert_eq!(
        (r.status, r.code, pos, r.started_at),
        (Status::Failed, TaskCode::DeadlinePassed, None, None)
    );
    assert_eq!(f.next_finished().await.id, swept.id);
    assert_eq!(f.status(&waits.id).await, Some((Status::Created, Some(0))));
}

/// A generator of the conformance model that steps every 20 ms until told to stop.
struct Steps;

impl Generator for Steps {
    fn models(&self) -> Vec<ModelInfo> {
        vec![model()]
    }

    fn generate(
        &mut self,
        _input: &Input,
        _output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure> {
        for step in 0..500 {
            if !progress(step, 500) {
                return Err(GenerateFailure::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(GenerateFailure::Failed("never told to stop".into()))
    }
}

pub(super) async fn a_running_task_is_cancelled_at_its_deadline(mut f: Fixture) {
    let cancel_at = now_ms() + 1000;
    let t = f.admit_with(Priority::Normal, Some(cancel_at)).await;
    f.enqueue(&t).await;
    let loras = Loras::new(LoraConfig::default(), f.dir.path(), false);
    let limits = WorkerLimits {
        max_work: 3000.0,
        max_loras: 0,
        max_task_time: None,
        nsfw_action: Default::default(),
    };
    let mut consumer = f.consumer();
    let (engine, finished) = (&f.engine, &mut f.finished);
    let rt = tokio::runtime::Handle::current();
    // the engine's worker loop on its own thread, until the engine drains
    let told = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            s.spawn(|| worker::work(engine, &mut *consumer, &mut Steps, limits, &loras));
            let told = rt.block_on(tokio::time::timeout(
                Duration::from_secs(10),
                finished.recv(),
            ));
            rt.block_on(engine.drain());
            told
        })
    });
    let r = told.expect("the task ends").unwrap();
    assert_eq!(
        (r.id.as_str(), r.status, r.code),
        (t.id.as_str(), Status::Cancelled, TaskCode::DeadlinePassed)
    );
    assert!(
        r.started_at.unwrap() < cancel_at && r.completed_at.unwrap() >= cancel_at,
        "started before its deadline, stopped after it: {r:?}"
    );
    assert!(
        r.error.contains("still running at its deadline"),
        "{}",
        r.error
    );
    let (stored, _) = f.engine.get(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.status, stored.code, stored.error),
        (Status::Cancelled, TaskCode::DeadlinePassed, r.error)
    );
}
