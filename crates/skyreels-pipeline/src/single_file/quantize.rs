//! `skyreels quantize`: a single-file checkpoint written as a GGUF.

use super::*;

/// What [`quantize_to_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// (ggml type name, tensors) in the order of [`crate::gguf::SUPPORTED`].
    pub types: Vec<(&'static str, usize)>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The type a K-quant falls back to for rows that are not whole 256-element super-blocks
/// (llama.cpp's `tensor_type_fallback`, with Q4_0 where it would pick the unsupported IQ4_NL).
fn fallback(dtype: GgmlDType) -> GgmlDType {
    match dtype {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        other => other,
    }
}

/// Writes a single-file checkpoint (any format [`SingleFile`] opens) as a GGUF of architecture
/// `hyvid` with the same key names: 2-D matmul weights in `dtype` (a K-quant falls back per
/// tensor when its rows do not divide into super-blocks, F16 when they do not divide at all),
/// every other tensor in F32 (exact for every float source). Scaled fp8 weights are written
/// scaled.
pub fn quantize_to_gguf(
    input: &Path,
    output: &Path,
    dtype: GgmlDType,
) -> Result<QuantizeReport, LoadError> {
    let file = SingleFile::open(input)?;
    let mut keys: Vec<String> = file
        .source_keys()
        .into_iter()
        .filter(|k| !is_scale_key(k))
        .collect();
    keys.sort();
    let mut tensors = Vec::with_capacity(keys.len());
    let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
    for key in &keys {
        let mut t = file.load_source(key)?.to_dtype(DType::F32)?;
        if let Some(&s) = file.scales.get(key) {
            t = (t * f64::from(s))?;
        }
        let cols = t.dims().last().copied().unwrap_or(1);
        let target = if t.rank() != 2 {
            GgmlDType::F32
        } else if cols.is_multiple_of(dtype.block_size()) {
            dtype
        } else if cols.is_multiple_of(fallback(dtype).block_size()) {
            fallback(dtype)
        } else {
            GgmlDType::F16
        };
        let q = QTensor::quantize(&t, target)?;
        *counts.entry(target).or_default() += 1;
        tensors.push((key.clone(), q));
    }
    let arch = gguf_file::Value::String("hyvid".into());
    let named: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, q)| (k.as_str(), q)).collect();
    let io = |source: std::io::Error| LoadError::Io {
        path: output.to_path_buf(),
        source,
    };
    let mut out = std::io::BufWriter::new(std::fs::File::create(output).map_err(io)?);
    gguf_file::write(&mut out, &[("general.architecture", &arch)], &named)?;
    std::io::Write::flush(&mut out).map_err(io)?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(QuantizeReport {
        types: crate::gguf::SUPPORTED
            .iter()
            .filter_map(|&(_, d, name)| counts.get(&d).map(|&n| (name, n)))
            .collect(),
        bytes_in: size(input),
        bytes_out: size(output),
    })
}
