//! The end-to-end fixtures of `scripts/fixtures/pipeline.py` (and the scripts that reuse its
//! format): a case's request, image and noise, and the bound its frames are held to.

use crate::{fixture, load_metadata, load_tensors};
use candle_core::Tensor;
use serde_json::Value;
use skyreels_pipeline::generate::{CacheSpec, GenerateError, GenerationParams, Pipeline, Video};
use std::collections::HashMap;

/// Frames are in [0, 1]. Both sides run f32 on the CPU; summation-order differences (~1e-6
/// relative per op) pass through the text encoders, up to 3 steps x 2 transformer passes and
/// the VAE decoder, and amplify through the sampling loop. The bound is 5e-4 absolute;
/// a wrong sign, scale or dtype step moves frames by >= 1e-2.
pub const FRAME_TOL: f32 = 5e-4;

/// A case of `tests/fixtures/pipeline/`: its tensors and its request.
pub fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    case_in("pipeline", name)
}

/// A case of `tests/fixtures/<dir>/` (scripts/fixtures/pipeline.py's format).
pub fn case_in(dir: &str, name: &str) -> (HashMap<String, Tensor>, Value) {
    let path = fixture(&format!("{dir}/{name}.safetensors"));
    let req = load_metadata(&path)["request"].clone();
    (load_tensors(&path), serde_json::from_str(&req).unwrap())
}

/// A fixture's request: its parameters, and the image and noise that go beside them.
#[derive(Clone)]
pub struct Request {
    pub p: GenerationParams,
    pub image: Option<image::RgbImage>,
    pub noise: Option<Tensor>,
}

impl Request {
    pub fn generate(
        &self,
        pipe: &Pipeline,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Video, GenerateError> {
        pipe.generate(&self.p, self.image.as_ref(), self.noise.as_ref(), on_step)
    }

    /// Runs to the end.
    pub fn run(&self, pipe: &Pipeline) -> Video {
        self.generate(pipe, &mut |_, _| true).unwrap()
    }

    /// Runs to the end and checks the run against a fixture's: its forward decisions (`want`,
    /// computed or cached, in order; the counts follow) and its frames within [`FRAME_TOL`].
    pub fn run_as(&self, pipe: &Pipeline, want: &[bool], frames: &Tensor, name: &str) -> Video {
        let video = self.run(pipe);
        let t = &video.timings;
        assert_eq!(t.forward_decisions, want, "{name}");
        let computed = want.iter().filter(|&&c| c).count();
        assert_eq!(
            (t.forwards_computed(), t.forwards_cached()),
            (computed, want.len() - computed),
            "{name}"
        );
        let err = crate::max_abs(&video.frames, frames);
        assert!(err <= FRAME_TOL, "{name}: max abs error {err:e}");
        video
    }

    /// The same request with other parameters.
    pub fn with(&self, edit: impl FnOnce(&mut GenerationParams)) -> Self {
        let mut r = self.clone();
        edit(&mut r.p);
        r
    }
}

/// The request of a case, with its image and noise.
pub fn params(io: &HashMap<String, Tensor>, req: &Value) -> Request {
    let image = io.get("image").map(|t| {
        let (h, w, _) = t.dims3().unwrap();
        let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        image::RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
    });
    let num = |k: &str| req[k].as_f64().unwrap();
    let p = GenerationParams {
        prompt: req["prompt"].as_str().unwrap().into(),
        negative_prompt: req["negative_prompt"].as_str().map(str::to_string),
        height: num("height") as usize,
        width: num("width") as usize,
        num_frames: num("num_frames") as usize,
        steps: num("steps") as usize,
        guidance_scale: num("guidance_scale"),
        embedded_guidance_scale: num("embedded_guidance_scale"),
        seed: 0,
        // the export's (the pipeline does not read it)
        fps: 24.0,
        // the step-cache fixtures name theirs ("first-block:T", "teacache:T")
        cache: req["cache"]
            .as_str()
            .map_or(CacheSpec::None, |c| c.parse().unwrap()),
        // the CFG-gating fixtures name their fraction
        cfg_gate: req["cfg_gate"].as_f64(),
        // the flow-shift fixture names its scheduler's shift
        flow_shift: req["flow_shift"].as_f64(),
        loras: Vec::new(),
        // the RIFLEx fixtures name their index
        riflex_freq_index: req["riflex_freq_index"].as_u64().unwrap_or(0) as usize,
    };
    Request {
        p,
        image,
        noise: Some(io["latents"].clone()),
    }
}
