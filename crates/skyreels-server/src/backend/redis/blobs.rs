//! Large values in Redis (uploaded images, finished videos) read in bounded windows.
//!
//! A whole-value `GET` makes Redis build the entire reply in the client's output buffer: 48
//! clients fetching a 60 MiB upload at once took it past 5 GB. Here every read is a `GETRANGE`
//! of at most [`WINDOW`] bytes, sent over the node's own blob connection (so a large read never
//! queues behind or in front of the control traffic of task records) and only while one of
//! [`CONCURRENT_WINDOWS`] permits is held: whatever the number of clients, a node has at most
//! `WINDOW * CONCURRENT_WINDOWS` bytes of blob replies in flight, and a slow client holds no
//! permit while it reads what it was sent.

use super::Conn;
use crate::engine::EngineError;
use bytes::Bytes;
use redis::AsyncCommands;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Bytes read per `GETRANGE`.
pub const WINDOW: u64 = 1 << 20;
/// Windows a node reads at once (over all clients).
pub const CONCURRENT_WINDOWS: usize = 4;

/// The node's reader of large values.
#[derive(Clone)]
pub(crate) struct Blobs {
    conn: Conn,
    permits: Arc<Semaphore>,
}

impl Blobs {
    pub fn new(conn: Conn) -> Self {
        Self {
            conn,
            permits: Arc::new(Semaphore::new(CONCURRENT_WINDOWS)),
        }
    }

    /// The length of a value; `None` when there is none.
    pub async fn len(&self, key: &str) -> Result<Option<u64>, EngineError> {
        let n: u64 = self.conn.clone().strlen(key).await?;
        Ok((n > 0).then_some(n))
    }

    /// Bytes `first..=last` of a value, one window (`last - first < WINDOW`).
    async fn window(&self, key: &str, first: u64, last: u64) -> Result<Bytes, EngineError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| EngineError::Closed)?;
        let got: Vec<u8> = self
            .conn
            .clone()
            .getrange(key, first as isize, last as isize)
            .await?;
        if got.len() as u64 != last - first + 1 {
            // expired or deleted while it was being read
            return Err(EngineError::Vanished);
        }
        Ok(Bytes::from(got))
    }

    /// Bytes `first..=last` of a value as a stream of windows, each read when the previous one
    /// has been taken (a client that reads slowly makes Redis wait, not buffer).
    pub fn stream(
        &self,
        key: String,
        first: u64,
        last: u64,
    ) -> impl futures_util::Stream<Item = Result<Bytes, EngineError>> + Send + 'static {
        let me = self.clone();
        futures_util::stream::try_unfold(first, move |at| {
            let (me, key) = (me.clone(), key.clone());
            async move {
                if at > last {
                    return Ok(None);
                }
                let end = last.min(at + WINDOW - 1);
                let bytes = me.window(&key, at, end).await?;
                Ok(Some((bytes, end + 1)))
            }
        })
    }
}
