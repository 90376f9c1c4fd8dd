//! What the queue holds of a task (its parameters and its image, fitted or as it came) and
//! where a stored value's bytes are.

use super::task::{Outcome, TaskCode};
use super::{EngineError, Input};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use std::path::PathBuf;

/// A large stored value.
#[derive(Clone, Copy, Debug)]
pub enum Blob<'a> {
    /// A completed upload's bytes, by upload id.
    Upload(&'a str),
    /// A finished video, by file name.
    Output(&'a str),
}

/// Reads bytes `first..=last` of a stored value as a stream.
pub type ReadRange =
    Box<dyn Fn(u64, u64) -> BoxStream<'static, Result<Bytes, EngineError>> + Send + Sync>;

/// Where a stored value's bytes are.
pub enum Content {
    /// A file on this machine.
    File(PathBuf),
    /// `len` bytes, read in bounded windows.
    Stream { len: u64, read: ReadRange },
}

impl Content {
    /// The whole value.
    pub async fn read_all(self) -> Result<Vec<u8>, EngineError> {
        use futures_util::TryStreamExt;
        match self {
            Content::File(p) => Ok(tokio::fs::read(p).await?),
            Content::Stream { len, read } => {
                let mut out = Vec::with_capacity(len as usize);
                if len > 0 {
                    let mut s = read(0, len - 1);
                    while let Some(chunk) = s.try_next().await? {
                        out.extend_from_slice(&chunk);
                    }
                }
                Ok(out)
            }
        }
    }
}

/// A task's input as it waits in the queue.
#[derive(Clone, Debug)]
pub struct Queued {
    pub params: skyreels_params::GenerationParams,
    pub image: Option<QueuedImage>,
}

/// A queued task's image.
#[derive(Clone, Debug)]
pub enum QueuedImage {
    /// Already fitted to the task's size (only what the model reads).
    Fitted(image::RgbImage),
    /// As it came (compressed): what a shared queue keeps, fitted by the worker.
    Encoded(Vec<u8>),
}

impl Queued {
    /// The input a worker runs: the image decoded (with the API's limits) and fitted to the
    /// task's size, as the API node would have; an image that does not decode fails the task
    /// with 1402.
    pub fn into_input(self) -> Result<Input, Outcome> {
        let (width, height) = (self.params.width, self.params.height);
        let image = match self.image {
            None => None,
            Some(QueuedImage::Fitted(i)) => Some(i),
            Some(QueuedImage::Encoded(bytes)) => {
                let img = crate::media::decode(&bytes)
                    .map_err(|e| Outcome::Failed(TaskCode::MediaAccessFailed, e.to_string()))?;
                Some(skyreels_params::fit_image(&img, width, height))
            }
        };
        Ok(Input {
            params: self.params,
            image,
            // the worker that takes the task finds the files, and reads its record's choice
            loras: Vec::new(),
            safety_check: true,
        })
    }

    /// The image as bytes to keep: the encoded ones (borrowed), or fitted pixels as a PNG.
    pub fn image_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.image {
            None => std::borrow::Cow::Borrowed(&[]),
            Some(QueuedImage::Encoded(b)) => std::borrow::Cow::Borrowed(b),
            Some(QueuedImage::Fitted(i)) => {
                let mut png = vec![];
                i.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .expect("an RGB image encodes as PNG in memory");
                std::borrow::Cow::Owned(png)
            }
        }
    }
}
