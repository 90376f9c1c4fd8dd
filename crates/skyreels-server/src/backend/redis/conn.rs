//! The node's connection to Redis, with a deadline on every command.

use crate::engine::COMMAND_TIMEOUT;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// The node's connection: a connection manager whose command is sent once more, after a short
/// pause, when the connection turned out to be broken (Redis restarted: the manager reconnects
/// on that error, so the second try normally goes through instead of failing a client). Every
/// script is safe to run twice (each checks the state it changes). A command that got no
/// answer within [`COMMAND_TIMEOUT`] is not sent again (Redis hangs: the client hears so
/// at once).
#[derive(Clone)]
pub(crate) struct Conn(pub(super) ConnectionManager);

impl Conn {
    fn retry(e: &redis::RedisError) -> bool {
        (e.is_connection_dropped() || e.is_io_error()) && !e.is_timeout()
    }

    async fn timed<T>(
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis did not answer in time",
            )
            .into()),
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            match Self::timed(self.0.req_packed_command(cmd)).await {
                Err(e) if Self::retry(&e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Self::timed(self.0.req_packed_command(cmd)).await
                }
                r => r,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        Box::pin(async move {
            match Self::timed(self.0.req_packed_commands(pipeline, offset, count)).await {
                Err(e) if Self::retry(&e) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Self::timed(self.0.req_packed_commands(pipeline, offset, count)).await
                }
                r => r,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}
