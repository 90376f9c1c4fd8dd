//! The fake generator every server in these tests runs, and the [`Gate`] that holds its steps.

use super::MODEL;
use skyreels_params::{CacheSpec, Ulysses};
use skyreels_server::generator::{
    GenerateFailure, Generated, Generator, Input, LoraOutcome, LoraSource, ModelInfo,
};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Blocks generation steps while closed.
#[derive(Clone, Default)]
pub(crate) struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub(crate) fn closed() -> Self {
        Self::default()
    }
    pub(crate) fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }
    /// Whether the gate is open, after waiting up to 20 ms for it.
    fn wait_a_little(&self) -> bool {
        let open = self.0 .0.lock().unwrap();
        if *open {
            return true;
        }
        *self
            .0
             .1
            .wait_timeout(open, Duration::from_millis(20))
            .unwrap()
            .0
    }
}

/// The fake generator: records each request in `seen`, holds every step at `gate`, and writes a
/// small text file as the video. A prompt containing "fail" fails, "panic" panics, and
/// "stubborn" ignores cancels. Its model has a safety checker, which flags a video whose prompt
/// contains "nsfw" (when the task asks for the checker). It reads each LoRA file it is given, as a real one parses it:
/// a file whose content it read before is a cache hit, and each line starting with
/// `unmatched` is a key that matched no layer; a hub file it cannot fetch (1401).
pub(crate) struct Fake {
    pub(crate) gate: Gate,
    pub(crate) seen: Arc<Mutex<Vec<Seen>>>,
    /// The Ulysses layout the fake's model reports (`--parallel ulysses=N`).
    pub(crate) ulysses: Option<Ulysses>,
    /// The contents of the LoRA files read so far (its adapter cache).
    pub(crate) lora_cache: HashSet<Vec<u8>>,
}

impl Fake {
    pub(crate) fn new(gate: Gate, seen: Arc<Mutex<Vec<Seen>>>) -> Self {
        Self {
            gate,
            seen,
            ulysses: None,
            lora_cache: HashSet::new(),
        }
    }

    /// Reads the input's LoRA files: what each reports.
    fn apply_loras(&mut self, input: &Input) -> Result<Vec<LoraOutcome>, GenerateFailure> {
        assert_eq!(
            input.loras.len(),
            input.params.loras.len(),
            "one source per LoRA"
        );
        input
            .loras
            .iter()
            .map(|source| {
                let LoraSource::File(path) = source else {
                    return Err(GenerateFailure::InvalidInput(format!(
                        "the fake generator cannot fetch {source:?}"
                    )));
                };
                let bytes = std::fs::read(path).map_err(|e| {
                    GenerateFailure::Failed(format!("cannot read {}: {e}", path.display()))
                })?;
                let unmatched_keys = bytes
                    .split(|b| *b == b'\n')
                    .filter(|l| l.starts_with(b"unmatched"))
                    .count();
                let cache_hit = !self.lora_cache.insert(bytes);
                Ok(LoraOutcome {
                    unmatched_keys,
                    cache_hit,
                })
            })
            .collect()
    }
}

impl Generator for Fake {
    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: MODEL.into(),
            image_to_video: true,
            defaults: skyreels_params::GenerationDefaults {
                height: 64,
                width: 96,
                num_frames: 9,
                num_inference_steps: 4,
                negative_prompt: None,
            },
            size_multiple: 16,
            // SkyReels' default clip, 960x544x97
            max_pixel_frames: 50_657_280,
            ulysses: self.ulysses,
            temporal_rope_frequencies: skyreels_params::HUNYUAN_TEMPORAL_ROPE_FREQUENCIES,
            safety_checker: Some(FAKE_CHECKER.into()),
        }]
    }

    fn generate(
        &mut self,
        input: &Input,
        output: &Path,
        progress: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Generated, GenerateFailure> {
        let req = &input.params;
        self.seen.lock().unwrap().push(Seen {
            params: req.clone(),
            image: input.image.clone(),
            loras: input.loras.clone(),
        });
        let loras = self.apply_loras(input)?;
        if req.prompt.contains("panic") {
            panic!("fake generator exploded");
        }
        if req.prompt.contains("fail") {
            return Err(GenerateFailure::Failed("fake failure".into()));
        }
        // "stubborn": a generator that never looks at the cancel answer (a last step, a decode)
        let obeys = !req.prompt.contains("stubborn");
        for step in 1..=req.steps {
            // while held at the gate, keep polling for cancellation as a real step loop would
            while !self.gate.wait_a_little() {
                if !progress(step - 1, req.steps) && obeys {
                    return Err(GenerateFailure::Cancelled);
                }
            }
            std::thread::sleep(Duration::from_millis(2));
            if !progress(step, req.steps) && obeys {
                return Err(GenerateFailure::Cancelled);
            }
        }
        std::fs::write(
            output,
            format!("fake mp4 {}x{} seed {}", req.width, req.height, req.seed),
        )
        .unwrap();
        // as a cache would: with one, the first step computes and the others come from it
        let cached = if req.cache == CacheSpec::None {
            0
        } else {
            req.steps as u64 - 1
        };
        let nsfw = input.safety_check.then(|| req.prompt.contains("nsfw"));
        let checked = nsfw.map(|_| ("safety_check", Duration::from_millis(3)));
        Ok(Generated {
            stages: [
                ("denoising", Duration::from_millis(40)),
                ("decoding", Duration::from_millis(2)),
            ]
            .into_iter()
            .chain(checked)
            .collect(),
            counts: vec![
                ("forwards_computed", req.steps as u64 - cached),
                ("forwards_cached", cached),
            ],
            loras,
            nsfw,
        })
    }
}

/// The safety checker the fake's model reports (`/api/v3/models`).
pub(crate) const FAKE_CHECKER: &str = "fake/safety-checker";

/// What the fake generator was given: the parameters (read through, as `seen.width`) and the
/// image.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) params: skyreels_params::GenerationParams,
    pub(crate) image: Option<image::RgbImage>,
    /// Where the worker found the LoRA files.
    pub(crate) loras: Vec<LoraSource>,
}

impl std::ops::Deref for Seen {
    type Target = skyreels_params::GenerationParams;
    fn deref(&self) -> &Self::Target {
        &self.params
    }
}
