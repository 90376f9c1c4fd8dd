//! Writing generated frames: MP4 (H.264 by openh264, muxed with fast-start by muxide), a folder of
//! PNG frames, or the float frames as safetensors.

use candle_core::{DType, Tensor};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, FrameType, RateControlMode, UsageType,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;
use openh264_sys2::{
    WelsTraceCallback, ENCODER_OPTION_TRACE_CALLBACK, WELS_LOG_ERROR, WELS_LOG_WARNING,
};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};

/// Default H.264 budget in bits per pixel per frame: about 6.3 Mbit/s at 960x544 and 24 fps.
/// openh264 writes the constrained baseline profile (no B-frames, CAVLC), which needs roughly
/// twice the bits of High profile for the same quality, and generated video is full of fine
/// texture that streaming rates (~0.1 bpp) smear; SkyReels users complain about exactly that.
pub const DEFAULT_BITS_PER_PIXEL: f64 = 0.5;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Frames(String),
    #[error("H.264 encoding: {0}")]
    Encode(String),
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

fn write_err(path: &Path) -> impl Fn(String) -> ExportError + '_ {
    move |message| ExportError::Write {
        path: path.to_path_buf(),
        message,
    }
}

/// The (count, height, width) of frames (f, h, w, 3) with at least one frame.
fn frame_dims(frames: &Tensor) -> Result<(usize, usize, usize), ExportError> {
    let (count, height, width, c) = frames.dims4()?;
    if c != 3 || count == 0 {
        return Err(ExportError::Frames(format!(
            "expected (frames, h, w, 3) with at least one frame, got {:?}",
            frames.dims()
        )));
    }
    Ok((count, height, width))
}

/// Frame `i` of frames (f, h, w, 3) in [0, 1] as 8-bit RGB, `round(x · 255)` (diffusers'
/// `numpy_to_pil`). The writers convert one frame at a time, so a clip is never held twice.
///
/// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/image_processor.py#L127-L149>
pub fn frame_rgb8(frames: &Tensor, i: usize) -> Result<Vec<u8>, ExportError> {
    Ok(frames
        .get(i)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect())
}

/// Encodes frames (f, h, w, 3) in [0, 1] as an H.264 MP4 with the index at the front (fast
/// start). `bitrate` in bit/s; None means [`DEFAULT_BITS_PER_PIXEL`].
pub fn write_mp4(
    path: &Path,
    frames: &Tensor,
    fps: f64,
    bitrate: Option<u32>,
) -> Result<(), ExportError> {
    if !(fps.is_finite() && fps > 0.0) {
        return Err(ExportError::Frames(format!(
            "fps must be positive, got {fps}"
        )));
    }
    let (count, h, w) = frame_dims(frames)?;
    if !(w.is_multiple_of(2) && h.is_multiple_of(2)) {
        return Err(ExportError::Frames(format!(
            "H.264 (4:2:0) needs even sizes, got {w}x{h}"
        )));
    }
    skyreels_params::check_encodable(h, w).map_err(|(_, rule)| ExportError::Frames(rule))?;
    let bps = bitrate.unwrap_or_else(|| {
        (DEFAULT_BITS_PER_PIXEL * (w * h) as f64 * fps).min(u32::MAX as f64) as u32
    });
    let config = EncoderConfig::new()
        .bitrate(BitRate::from_bps(bps))
        .max_frame_rate(FrameRate::from_hz(fps as f32))
        .rate_control_mode(RateControlMode::Bitrate)
        .usage_type(UsageType::CameraVideoRealTime)
        .skip_frames(false);
    let enc_err = |e: openh264::Error| ExportError::Encode(e.to_string());
    let mut encoder =
        Encoder::with_api_config(OpenH264API::from_source(), config).map_err(enc_err)?;
    log_through_tracing(&mut encoder);
    let file = std::fs::File::create(path).map_err(|e| write_err(path)(e.to_string()))?;
    let mut muxer = muxide::api::MuxerBuilder::new(std::io::BufWriter::new(file))
        .video(muxide::api::VideoCodec::H264, w as u32, h as u32, fps)
        .with_fast_start(true)
        .build()
        .map_err(|e| write_err(path)(e.to_string()))?;
    let mut yuv = YUVBuffer::new(w, h);
    for i in 0..count {
        yuv.read_rgb8(RgbSliceU8::new(&frame_rgb8(frames, i)?, (w, h)));
        let (key, data) = encoder
            .encode(&yuv)
            .map(|b| {
                let key = matches!(b.frame_type(), FrameType::IDR | FrameType::I);
                (key, b.to_vec())
            })
            .map_err(enc_err)?;
        if data.is_empty() {
            return Err(ExportError::Encode(format!("frame {i} produced no data")));
        }
        muxer
            .write_video(i as f64 / fps, &data, key)
            .map_err(|e| write_err(path)(e.to_string()))?;
    }
    muxer.finish().map_err(|e| write_err(path)(e.to_string()))?;
    Ok(())
}

/// OpenH264's warning that a bitrate cannot be held without skipping frames: expected, since
/// frames are never skipped here (every generated frame is kept).
const KNOWN_ENCODER_WARNING: &str = "bitrate can't be controlled";

/// Routes the encoder's own log (its parameter checks when the first frame initializes it,
/// which it would otherwise print to the process's standard error) to `tracing`, through
/// OpenH264's log callback. OpenH264 takes this option before initialization (`SetOption`
/// accepts `ENCODER_OPTION_TRACE_CALLBACK` then); after it, the `openh264` crate sets the log
/// level to quiet.
fn log_through_tracing(encoder: &mut Encoder) {
    let callback: WelsTraceCallback = Some(encoder_log);
    // SAFETY: `raw_api` is used for one documented option; OpenH264 copies the function
    // pointer it is given a pointer to (`*(WelsTraceCallback*)pOption`) during the call.
    let answer = unsafe {
        encoder.raw_api().set_option(
            ENCODER_OPTION_TRACE_CALLBACK,
            (&raw const callback).cast_mut().cast(),
        )
    };
    if answer != 0 {
        tracing::debug!("the H.264 encoder refused its log callback ({answer})");
    }
}

/// OpenH264's log lines, as `tracing` events (its warnings as warnings, except the known one).
unsafe extern "C" fn encoder_log(_ctx: *mut c_void, level: c_int, text: *const c_char) {
    if text.is_null() {
        return;
    }
    // SAFETY: OpenH264 passes a NUL-terminated string that lives for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let text = text.trim();
    let message = text.rsplit("Warning:").next().unwrap_or(text).trim();
    match level {
        l if l <= WELS_LOG_ERROR as c_int => tracing::error!("H.264 encoder: {message}"),
        l if l <= WELS_LOG_WARNING as c_int && !text.contains(KNOWN_ENCODER_WARNING) => {
            tracing::warn!("H.264 encoder: {message}")
        }
        _ => tracing::debug!("H.264 encoder: {message}"),
    }
}

/// Writes frames (f, h, w, 3) in [0, 1] as `frame_00000.png`, ... into `dir` (created if
/// needed).
pub fn write_png_dir(dir: &Path, frames: &Tensor) -> Result<(), ExportError> {
    let (count, h, w) = frame_dims(frames)?;
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir)(e.to_string()))?;
    for i in 0..count {
        let path = dir.join(format!("frame_{i:05}.png"));
        image::save_buffer(
            &path,
            &frame_rgb8(frames, i)?,
            w as u32,
            h as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| write_err(&path)(e.to_string()))?;
    }
    Ok(())
}

/// Writes the float frames (f, h, w, 3) as the tensor `frames` of a safetensors file.
pub fn write_safetensors(path: &Path, frames: &Tensor) -> Result<(), ExportError> {
    let frames = frames.to_dtype(DType::F32)?.contiguous()?;
    candle_core::safetensors::save(&[("frames", frames)].into_iter().collect(), path)
        .map_err(|e| write_err(path)(e.to_string()))
}

/// Output kinds by path: `.mp4`, `.safetensors`, or anything else as a folder of PNG frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Mp4,
    Safetensors,
    PngDir,
}

impl OutputKind {
    pub fn of(path: &Path) -> Self {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "mp4" => Self::Mp4,
            Some(e) if e == "safetensors" => Self::Safetensors,
            _ => Self::PngDir,
        }
    }
}

/// Writes frames (f, h, w, 3) in [0, 1] to `path` as [`OutputKind::of`] says.
pub fn write_output(
    path: &Path,
    frames: &Tensor,
    fps: f64,
    bitrate: Option<u32>,
) -> Result<(), ExportError> {
    match OutputKind::of(path) {
        OutputKind::Mp4 => write_mp4(path, frames, fps, bitrate),
        OutputKind::Safetensors => write_safetensors(path, frames),
        OutputKind::PngDir => write_png_dir(path, frames),
    }
}
