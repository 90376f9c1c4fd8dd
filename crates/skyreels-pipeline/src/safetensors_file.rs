//! Safetensors files read one tensor at a time with plain reads, never memory-mapped: a file
//! truncated or replaced while a model loads (or reloads, as `--offload model` does for every
//! task) makes that read an error naming the file, where a memory map would end the whole
//! process with SIGBUS. The pages read go through the page cache as a map's would.

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};
use safetensors::tensor::{Metadata, TensorInfo, TensorView};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

/// Longest header accepted (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// An open safetensors file: its validated header, and the file to read tensors from.
pub struct SafetensorsFile {
    file: Mutex<File>,
    metadata: Metadata,
    /// Absolute position of the data buffer (after the length and the header).
    data_start: u64,
}

impl SafetensorsFile {
    /// Reads and checks the header: every tensor's extent inside the data buffer, the buffer's
    /// length against the file's.
    pub fn open(path: &Path) -> Result<Self, String> {
        let mut file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| format!("{len} bytes, shorter than a safetensors header"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES || n > len - 8 {
            return Err(format!("a header of {n} bytes in a file of {len}"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| format!("reading the header: {e}"))?;
        let header = std::str::from_utf8(&header).map_err(|_| "the header is not UTF-8")?;
        let metadata: Metadata =
            serde_json::from_str(header).map_err(|e| format!("invalid header: {e}"))?;
        let data_start = 8 + n;
        let data = metadata.data_len() as u64;
        if data != len - data_start {
            return Err(format!(
                "the header describes {data} bytes of tensor data, the file holds {} (truncated?)",
                len - data_start
            ));
        }
        Ok(Self {
            file: Mutex::new(file),
            metadata,
            data_start,
        })
    }

    /// Every tensor name, in file order.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// A tensor's dtype, shape and extent.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    /// Reads one tensor, in its stored dtype, onto `device`.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let Some(info) = self.info(name) else {
            candle_core::bail!("no tensor {name}")
        };
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        {
            let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
            file.seek(SeekFrom::Start(self.data_start + start as u64))?;
            file.read_exact(&mut bytes).map_err(|e| {
                candle_core::Error::Msg(format!("reading tensor {name}: {e} (truncated?)"))
            })?;
        }
        TensorView::new(info.dtype, info.shape.clone(), &bytes)
            .map_err(candle_core::Error::wrap)?
            .load(device)
    }
}
