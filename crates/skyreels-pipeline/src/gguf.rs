//! Reading GGUF files: the header (metadata and tensor table) and one tensor's blocks at a time.
//!
//! candle's `gguf_file` refuses tensors of more than 4 dimensions, but HunyuanVideo GGUFs (city96's,
//! made with ComfyUI-GGUF's tools) store the patch embedding's 5-D convolution as is, so the header
//! is parsed here; the blocks become candle `QTensor`s.

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: u32 = 0x4655_4747; // "GGUF"
const DEFAULT_ALIGNMENT: u64 = 32;
/// Longer strings or arrays than this in a header are taken as corruption.
const MAX_HEADER_ITEMS: u64 = 1 << 24;

/// The ggml types that load, with their GGUF ids and names.
pub const SUPPORTED: [(u32, GgmlDType, &str); 13] = [
    (0, GgmlDType::F32, "F32"),
    (1, GgmlDType::F16, "F16"),
    (30, GgmlDType::BF16, "BF16"),
    (8, GgmlDType::Q8_0, "Q8_0"),
    (14, GgmlDType::Q6K, "Q6_K"),
    (13, GgmlDType::Q5K, "Q5_K"),
    (12, GgmlDType::Q4K, "Q4_K"),
    (11, GgmlDType::Q3K, "Q3_K"),
    (10, GgmlDType::Q2K, "Q2_K"),
    (6, GgmlDType::Q5_0, "Q5_0"),
    (7, GgmlDType::Q5_1, "Q5_1"),
    (2, GgmlDType::Q4_0, "Q4_0"),
    (3, GgmlDType::Q4_1, "Q4_1"),
];

/// Names of the ggml types llama.cpp defines that do not load here (for the error message).
fn unsupported_name(id: u32) -> String {
    let name = match id {
        9 => "Q8_1",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => return format!("type id {id}"),
    };
    name.to_string()
}

pub fn type_name(dtype: GgmlDType) -> &'static str {
    SUPPORTED.iter().find(|s| s.1 == dtype).map_or("?", |s| s.2)
}

/// One tensor of the table.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub dtype: GgmlDType,
    /// Outermost first (PyTorch order), after any `comfy.gguf.orig_shape` reshape.
    pub shape: Vec<usize>,
    /// Absolute position of the first block in the file.
    start: u64,
    bytes: usize,
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    file: Mutex<BufReader<File>>,
    pub architecture: Option<String>,
    pub tensors: HashMap<String, GgufTensor>,
}

/// A header value, as far as loading needs one.
enum Value {
    Str(String),
    Ints(Vec<i64>),
    Int(i64),
    Other,
}

struct Header<'a, R> {
    r: &'a mut R,
    remaining: u64,
}

impl<R: Read> Header<'_, R> {
    fn bytes(&mut self, n: u64) -> Result<Vec<u8>, String> {
        if n > self.remaining {
            return Err(format!(
                "the header needs {n} more bytes, the file has {}",
                self.remaining
            ));
        }
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| format!("reading the header: {e}"))?;
        self.remaining -= n;
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn count(&mut self) -> Result<u64, String> {
        let n = self.u64()?;
        if n > MAX_HEADER_ITEMS {
            return Err(format!("a header count of {n} (corrupt file?)"));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.count()?;
        String::from_utf8(self.bytes(n)?).map_err(|_| "a header string is not UTF-8".to_string())
    }
    /// A scalar of value type `t` as an integer when it is one.
    fn scalar(&mut self, t: u32) -> Result<Option<i64>, String> {
        let size = match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => return Err(format!("unknown metadata value type {t}")),
        };
        let b = self.bytes(size)?;
        Ok(match t {
            0 => Some(i64::from(b[0])),
            1 => Some(i64::from(b[0] as i8)),
            2 => Some(i64::from(u16::from_le_bytes([b[0], b[1]]))),
            3 => Some(i64::from(i16::from_le_bytes([b[0], b[1]]))),
            4 => Some(i64::from(u32::from_le_bytes(b[..4].try_into().expect("4")))),
            5 => Some(i64::from(i32::from_le_bytes(b[..4].try_into().expect("4")))),
            10 => i64::try_from(u64::from_le_bytes(b[..8].try_into().expect("8"))).ok(),
            11 => Some(i64::from_le_bytes(b[..8].try_into().expect("8"))),
            _ => None,
        })
    }
    fn value(&mut self, t: u32) -> Result<Value, String> {
        Ok(match t {
            8 => Value::Str(self.string()?),
            9 => {
                let item = self.u32()?;
                let n = self.count()?;
                let mut ints = Vec::new();
                for _ in 0..n {
                    match item {
                        8 => drop(self.string()?),
                        9 => return Err("nested metadata arrays are not supported".into()),
                        _ => ints.extend(self.scalar(item)?),
                    }
                }
                if item == 8 {
                    Value::Other
                } else {
                    Value::Ints(ints)
                }
            }
            _ => match self.scalar(t)? {
                Some(v) => Value::Int(v),
                None => Value::Other,
            },
        })
    }
}

impl Gguf {
    /// Reads the header and checks every tensor's type and extent against the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut r = BufReader::new(file);
        let mut h = Header {
            r: &mut r,
            remaining: len,
        };
        if h.u32()? != MAGIC {
            return Err("not a GGUF file (no GGUF magic)".into());
        }
        let version = h.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} (only 2 and 3 load)"));
        }
        let n_tensors = h.count()?;
        let n_kv = h.count()?;
        let mut meta = HashMap::new();
        for _ in 0..n_kv {
            let key = h.string()?;
            let t = h.u32()?;
            meta.insert(key, h.value(t)?);
        }
        let mut table = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = h.string()?;
            let n_dims = h.u32()?;
            if n_dims == 0 || n_dims > 8 {
                return Err(format!("tensor {name} has {n_dims} dimensions"));
            }
            let mut shape = (0..n_dims)
                .map(|_| {
                    let d = h.u64()?;
                    usize::try_from(d).map_err(|_| format!("tensor {name} is too large"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            shape.reverse();
            let id = h.u32()?;
            let Some(&(_, dtype, _)) = SUPPORTED.iter().find(|s| s.0 == id) else {
                return Err(format!(
                    "tensor {name} is {}, which does not load; supported types: {}",
                    unsupported_name(id),
                    SUPPORTED.map(|s| s.2).join(", ")
                ));
            };
            let offset = h.u64()?;
            table.push((name, dtype, shape, offset));
        }
        let alignment = match meta.get("general.alignment") {
            Some(Value::Int(a)) if *a > 0 => *a as u64,
            _ => DEFAULT_ALIGNMENT,
        };
        let position = len - h.remaining;
        let data_start = position.div_ceil(alignment) * alignment;
        let architecture = match meta.get("general.architecture") {
            Some(Value::Str(a)) => Some(a.clone()),
            _ => None,
        };
        let mut tensors = HashMap::with_capacity(table.len());
        for (name, dtype, mut shape, offset) in table {
            if tensors.contains_key(&name) {
                return Err(format!("tensor {name} appears twice in the table"));
            }
            let too_large = || format!("tensor {name} is too large ({shape:?})");
            let elems = shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .ok_or_else(too_large)?;
            if elems == 0 {
                return Err(format!("tensor {name} has no elements ({shape:?})"));
            }
            let cols = *shape.last().expect("at least one dimension");
            if !cols.is_multiple_of(dtype.block_size()) {
                return Err(format!(
                    "tensor {name}: rows of {cols} are not whole {} blocks of {}",
                    type_name(dtype),
                    dtype.block_size()
                ));
            }
            let bytes = (elems / dtype.block_size())
                .checked_mul(dtype.type_size())
                .ok_or_else(too_large)?;
            let start = data_start.saturating_add(offset);
            if start.saturating_add(bytes as u64) > len {
                return Err(format!(
                    "tensor {name} ends at byte {} but the file has {len} (truncated?)",
                    start.saturating_add(bytes as u64)
                ));
            }
            // ComfyUI-GGUF stores some tensors flattened and records their shape
            if let Some(Value::Ints(orig)) = meta.get(&format!("comfy.gguf.orig_shape.{name}")) {
                let orig: Vec<usize> = orig.iter().map(|&d| d.max(0) as usize).collect();
                let orig_elems = orig.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
                if orig_elems != Some(elems) || orig.last() != Some(&cols) {
                    return Err(format!(
                        "tensor {name}: orig_shape {orig:?} does not fit its {shape:?}"
                    ));
                }
                shape = orig;
            }
            tensors.insert(
                name,
                GgufTensor {
                    dtype,
                    shape,
                    start,
                    bytes,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(r),
            architecture,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The blocks of `rows` (ranges over the first dimension, concatenated; the whole tensor when
    /// empty) as a `QTensor` on `device`.
    pub fn read(
        &self,
        name: &str,
        rows: &[Range<usize>],
        device: &Device,
    ) -> candle_core::Result<QTensor> {
        let Some(t) = self.tensors.get(name) else {
            candle_core::bail!("{}: no tensor {name}", self.path.display())
        };
        let read = |start: u64, len: usize| -> candle_core::Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            let mut f = self.file.lock().expect("gguf file lock poisoned");
            f.seek(SeekFrom::Start(t.start + start))?;
            f.read_exact(&mut buf)?;
            Ok(buf)
        };
        if rows.is_empty() {
            let raw = read(0, t.bytes)?;
            return QTensor::new(
                QStorage::from_data(Cow::Owned(raw), device, t.dtype)?,
                t.shape.clone(),
            );
        }
        if t.shape.len() == 1 && t.dtype.block_size() != 1 {
            candle_core::bail!(
                "{name}: a 1-D {} tensor cannot be split",
                type_name(t.dtype)
            )
        }
        // whole rows are whole blocks: each range is one contiguous read
        let per_row = t.bytes / t.shape[0].max(1);
        let mut picked = Vec::new();
        let mut n = 0;
        for r in rows {
            if r.end > t.shape[0] || r.start > r.end {
                candle_core::bail!("{name}: rows {r:?} of {}", t.shape[0])
            }
            picked.extend(read((r.start * per_row) as u64, r.len() * per_row)?);
            n += r.len();
        }
        let mut shape = t.shape.clone();
        shape[0] = n;
        QTensor::new(
            QStorage::from_data(Cow::Owned(picked), device, t.dtype)?,
            shape,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tensor of a test table: name, shape outermost first, bytes of data to reserve.
    pub(crate) type Entry<'a> = (&'a str, &'a [u64], usize);

    /// A GGUF v3 file (architecture "hyvid") of F32 tensors, each at the next 32-byte aligned
    /// offset.
    pub(crate) fn gguf_bytes(tensors: &[Entry]) -> Vec<u8> {
        fn string(b: &mut Vec<u8>, s: &str) {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        }
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(1u64.to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        string(&mut b, "hyvid");
        let mut offset = 0u64;
        for (name, shape, bytes) in tensors {
            string(&mut b, name);
            b.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                b.extend(d.to_le_bytes());
            }
            b.extend(0u32.to_le_bytes()); // F32
            b.extend(offset.to_le_bytes());
            offset += (*bytes as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        b.resize(b.len().div_ceil(32) * 32 + offset as usize, 0);
        b
    }

    fn open(tensors: &[Entry]) -> Result<Gguf, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, gguf_bytes(tensors)).unwrap();
        Gguf::open(&path)
    }

    #[test]
    fn a_well_formed_table_opens() {
        let g = open(&[("a", &[2, 4], 32), ("b", &[3], 12)]).unwrap();
        assert_eq!(g.tensors["a"].shape, vec![2, 4]);
        assert_eq!(g.tensors["b"].shape, vec![3]);
        assert_eq!(g.architecture.as_deref(), Some("hyvid"));
    }

    #[test]
    fn hostile_tables_are_errors_not_panics() {
        let cases: [(&[Entry], &str); 5] = [
            (
                &[("a", &[4], 16), ("a", &[4], 16)],
                "tensor a appears twice",
            ),
            (&[("a", &[0, 4], 0)], "tensor a has no elements"),
            (&[("a", &[4, 0], 0)], "tensor a has no elements"),
            // the element count overflows
            (&[("a", &[1 << 40, 1 << 40], 0)], "tensor a is too large"),
            // the byte count overflows
            (&[("a", &[1 << 62], 0)], "tensor a is too large"),
        ];
        for (table, want) in cases {
            let e = open(table).err().unwrap_or_default();
            assert!(e.contains(want), "{table:?}: {e}");
        }
    }
}
