//! The sweep every node of a Redis deployment runs (at most every 30 s, with its housekeeping): what nobody else ends.
//! Tasks past their deadline fail with 5005; tasks that cannot start (their input never
//! queued, their wait past the queue TTL, their model served by no worker anymore) with 5003; workers gone for long lose their model
//! lists and their consumers in the group; a model no live worker announced for
//! `forget_models_after` is forgotten (submits naming it get 404 instead of waiting forever).

use super::{Cluster, GROUP, KEYS};
use crate::engine::task::{now_ms, JobRecord};
use crate::engine::{EngineError, Priority, Unstartable};
use redis::streams::StreamInfoConsumersReply;
use redis::AsyncCommands;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

impl Cluster {
    /// Finds the waiting tasks that cannot start (past their deadline; never queued `stalled`
    /// after their admission: the node preparing their input stopped; waiting past the queue
    /// TTL; for a forgotten model), forgets waiting entries whose record is gone, dead workers
    /// and retired models. Returns the tasks to fail, with the code and the reason.
    pub(super) async fn sweep(&self, stalled: Duration) -> Result<Vec<Unstartable>, EngineError> {
        self.forget_dead_workers().await?;
        let models = self.forget_retired_models().await?;
        self.fail_unstartable(stalled, &models).await
    }

    async fn fail_unstartable(
        &self,
        stalled: Duration,
        models: &HashSet<String>,
    ) -> Result<Vec<Unstartable>, EngineError> {
        let mut c = self.conn();
        let ids: Vec<String> = c.zrange(KEYS.waiting(), 0, -1).await?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(KEYS.task(id))
                .arg("enqueued")
                .arg("record");
        }
        let found: Vec<(Option<String>, Option<Vec<u8>>)> = pipe.query_async(&mut c).await?;
        let (now, ttl) = (now_ms(), self.config.queue_ttl);
        let mut unstartable = vec![];
        for (id, (enqueued, record)) in ids.iter().zip(found) {
            let Some(r) = record.and_then(|r| serde_json::from_slice::<JobRecord>(&r).ok()) else {
                let _: () = c.zrem(KEYS.waiting(), id).await?;
                continue;
            };
            if r.is_past_deadline(now) {
                unstartable.push(Unstartable::past_deadline(&r));
                continue;
            }
            let age = Duration::from_millis(now.saturating_sub(r.created_at));
            let why = if !models.contains(&r.model) {
                format!(
                    "no worker has served {} for {} minutes; it is no longer offered",
                    r.model,
                    self.config.forget_models_after.as_secs() / 60
                )
            } else if enqueued.is_none() && age > stalled {
                "the node preparing this task stopped before it was queued; submit it again".into()
            } else if age > ttl {
                format!(
                    "the task did not start within {} of its submit (the queue TTL); submit it \
                     again later",
                    humantime::format_duration(ttl)
                )
            } else {
                continue;
            };
            unstartable.push(Unstartable::unavailable(id, why));
        }
        Ok(unstartable)
    }

    /// Workers without a heartbeat for ten claim timeouts: off the live list, their model
    /// lists dropped, their idle consumers (nothing pending) deleted from each queue's group.
    async fn forget_dead_workers(&self) -> Result<(), EngineError> {
        let mut c = self.conn();
        let gone_ms = 10 * self.config.claim_timeout.as_millis() as u64;
        let cutoff = now_ms().saturating_sub(gone_ms);
        let _: () = c.zrembyscore(KEYS.workers(), 0, cutoff).await?;
        let live: HashSet<String> = c.zrange(KEYS.workers(), 0, -1).await?;
        let listed: Vec<String> = c.hkeys(KEYS.worker_models()).await?;
        let dead: Vec<&String> = listed.iter().filter(|w| !live.contains(*w)).collect();
        if !dead.is_empty() {
            let _: () = c.hdel(KEYS.worker_models(), &dead).await?;
        }
        let models: Vec<String> = c.hkeys(KEYS.models()).await?;
        let queues = models
            .iter()
            .flat_map(|m| [Priority::Normal, Priority::Low].map(|p| KEYS.stream(m, p)));
        for queue in queues {
            let info: redis::RedisResult<StreamInfoConsumersReply> =
                c.xinfo_consumers(&queue, GROUP).await;
            // no stream or no group yet: nothing to forget
            let Ok(info) = info else { continue };
            for consumer in info.consumers {
                let idle = consumer.idle as u64;
                if consumer.pending == 0 && idle > gone_ms && !live.contains(&consumer.name) {
                    let _: () = redis::cmd("XGROUP")
                        .arg("DELCONSUMER")
                        .arg(&queue)
                        .arg(GROUP)
                        .arg(&consumer.name)
                        .query_async(&mut c)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Forgets the models no live worker announced for `forget_models_after`; the ids of the
    /// models still offered.
    async fn forget_retired_models(&self) -> Result<HashSet<String>, EngineError> {
        let mut c = self.conn();
        let models: Vec<String> = c.hkeys(KEYS.models()).await?;
        let seen: HashMap<String, u64> = c.hgetall(KEYS.models_seen()).await?;
        let now = now_ms();
        let limit = self.config.forget_models_after.as_millis() as u64;
        let mut offered = HashSet::new();
        for m in models {
            match seen.get(&m) {
                Some(t) if now.saturating_sub(*t) > limit => {
                    tracing::warn!(model = %m, "no worker served this model for long: forgetting it");
                    let _: () = redis::pipe()
                        .hdel(KEYS.models(), &m)
                        .hdel(KEYS.models_seen(), &m)
                        .query_async(&mut c)
                        .await?;
                }
                Some(_) => {
                    offered.insert(m);
                }
                None => {
                    // announced before this bookkeeping existed: its clock starts now
                    let _: () = c.hset(KEYS.models_seen(), &m, now).await?;
                    offered.insert(m);
                }
            }
        }
        Ok(offered)
    }
}
