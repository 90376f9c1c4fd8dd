//! diffusers' `StableDiffusionSafetyChecker`: a CLIP vision tower whose projected image embedding
//! is compared (cosine) with 17 concept and 3 "special care" embeddings, each with a threshold.
//!
//! [`StableDiffusionSafetyChecker::forward`] follows the reference's `forward` (not
//! `forward_onnx`, which differs: it does not round and adjusts every special score alike):
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/stable_diffusion/safety_checker.py#L26-L103>

use crate::clip::{ClipVisionConfig, ClipVisionModel};
use crate::layers::linear::{linear_b, Linear};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// Concept embeddings of every checker (`torch.ones(17, projection_dim)` in `__init__`).
pub const CONCEPTS: usize = 17;
/// "Special care" embeddings (`torch.ones(3, projection_dim)`).
pub const SPECIAL_CARE: usize = 3;
/// What a positive special-care score adds to the scores after it (`adjustment = 0.01`).
pub const SPECIAL_CARE_ADJUSTMENT: f32 = 0.01;

/// The fields of the checker's `CLIPConfig` it needs. `vision_config_dict`, which configs saved
/// by older transformers carry, wins over `vision_config` when present (as `CLIPConfig` does);
/// absent fields take `CLIPConfig`'s defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SafetyCheckerConfig {
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default)]
    pub vision_config: ClipVisionConfig,
    #[serde(default)]
    pub vision_config_dict: Option<ClipVisionConfig>,
}

fn default_projection_dim() -> usize {
    512
}

impl SafetyCheckerConfig {
    /// The vision tower's config.
    pub fn vision(&self) -> &ClipVisionConfig {
        self.vision_config_dict
            .as_ref()
            .unwrap_or(&self.vision_config)
    }

    pub fn validate(&self) -> Result<()> {
        if self.projection_dim == 0 {
            candle_core::bail!("safety checker config: projection_dim must be > 0")
        }
        self.vision().validate()
    }
}

/// One image's scores, as the reference's per-image `result_img` holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct ConceptScores {
    /// `special_scores`, one per special-care concept, rounded to 3 decimals.
    pub special_scores: Vec<f32>,
    /// `concept_scores`, one per concept, rounded to 3 decimals (+0.01 after special care).
    pub concept_scores: Vec<f32>,
    /// Some special score is > 0 (the reference's `special_care` is not empty).
    pub special_care: bool,
    /// Some concept score is > 0: the image is NSFW (`has_nsfw_concepts`).
    pub nsfw: bool,
}

/// `round(x, 3)` on a float32 as numpy computes it: x · 1000 and the division in float32, the
/// rounding half to even (`np.round` on an `np.float32` scalar).
pub fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

/// The reference's scoring loop for one image, from its cosine distances to the special-care and
/// concept embeddings and their thresholds (the `*_embeds_weights`), all float32 like the
/// reference's numpy values. A special score > 0 sets the adjustment to 0.01 for every score
/// computed after it: the remaining special ones and all concept ones.
pub fn concept_scores(
    special_cos: &[f32],
    special_thresholds: &[f32],
    cos: &[f32],
    thresholds: &[f32],
) -> ConceptScores {
    let mut adjustment = 0.0f32;
    let mut special_care = false;
    let special_scores = special_cos
        .iter()
        .zip(special_thresholds)
        .map(|(&c, &t)| {
            let score = round3(c - t + adjustment);
            if score > 0.0 {
                special_care = true;
                adjustment = SPECIAL_CARE_ADJUSTMENT;
            }
            score
        })
        .collect();
    let concept_scores: Vec<f32> = cos
        .iter()
        .zip(thresholds)
        .map(|(&c, &t)| round3(c - t + adjustment))
        .collect();
    let nsfw = concept_scores.iter().any(|&s| s > 0.0);
    ConceptScores {
        special_scores,
        concept_scores,
        special_care,
        nsfw,
    }
}

/// `cosine_distance`: rows of `a` (n, k) and `b` (m, k) L2-normalized (`F.normalize`, eps
/// 1e-12), then a (n, m) matrix of dot products.
pub fn cosine_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let normalize = |t: &Tensor| -> Result<Tensor> {
        let norm = t
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        t.broadcast_div(&norm)
    };
    normalize(a)?.matmul(&normalize(b)?.t()?)
}

/// The cosine distances of a batch, float32: (b, special care concepts) and (b, concepts).
#[derive(Debug, Clone)]
pub struct CosineDistances {
    pub special: Vec<Vec<f32>>,
    pub concept: Vec<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct StableDiffusionSafetyChecker {
    vision_model: ClipVisionModel,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    /// `concept_embeds_weights`: the thresholds, as float32 values of the run dtype
    concept_embeds_weights: Vec<f32>,
    special_care_embeds_weights: Vec<f32>,
}

impl StableDiffusionSafetyChecker {
    /// `vb` is the checkpoint's root (`visual_projection`, `concept_embeds`, ...), `vision` its
    /// CLIP vision tower: `vision_model` as transformers 5.x saves it, `vision_model.vision_model`
    /// as 4.x did (every published checker).
    pub fn new(cfg: &SafetyCheckerConfig, vb: VarBuilder, vision: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (hidden, proj) = (cfg.vision().hidden_size, cfg.projection_dim);
        let thresholds = |name: &str, n: usize| -> Result<Vec<f32>> {
            vb.get(n, name)?.to_dtype(DType::F32)?.to_vec1()
        };
        Ok(Self {
            vision_model: ClipVisionModel::new(cfg.vision(), vision)?,
            visual_projection: linear_b(hidden, proj, false, vb.pp("visual_projection"))?,
            concept_embeds: vb.get((CONCEPTS, proj), "concept_embeds")?,
            special_care_embeds: vb.get((SPECIAL_CARE, proj), "special_care_embeds")?,
            concept_embeds_weights: thresholds("concept_embeds_weights", CONCEPTS)?,
            special_care_embeds_weights: thresholds("special_care_embeds_weights", SPECIAL_CARE)?,
        })
    }

    pub fn vision_config(&self) -> &ClipVisionConfig {
        self.vision_model.config()
    }

    /// The cosine distances of images `clip_input` (b, channels, size, size) to the special-care
    /// and concept embeddings, computed in the model's dtype and returned as float32 (the
    /// reference's `.cpu().float().numpy()`).
    pub fn cosine_distances(&self, clip_input: &Tensor) -> Result<CosineDistances> {
        let pooled = self.vision_model.pooled(clip_input)?;
        let image_embeds = self.visual_projection.forward(&pooled)?;
        let host = |t: Tensor| t.to_dtype(DType::F32)?.to_vec2::<f32>();
        Ok(CosineDistances {
            special: host(cosine_distance(&image_embeds, &self.special_care_embeds)?)?,
            concept: host(cosine_distance(&image_embeds, &self.concept_embeds)?)?,
        })
    }

    /// The scores of one image from its distances ([`concept_scores`] with this checker's
    /// thresholds).
    pub fn scores(&self, special_cos: &[f32], cos: &[f32]) -> ConceptScores {
        concept_scores(
            special_cos,
            &self.special_care_embeds_weights,
            cos,
            &self.concept_embeds_weights,
        )
    }

    /// The reference's `forward` without the image blanking: per image of `clip_input`, its
    /// scores and NSFW flag.
    pub fn forward(&self, clip_input: &Tensor) -> Result<Vec<ConceptScores>> {
        let d = self.cosine_distances(clip_input)?;
        Ok(d.special
            .iter()
            .zip(&d.concept)
            .map(|(s, c)| self.scores(s, c))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round3_is_numpy_float32_round() {
        // values from numpy 2.4: [round(np.float32(v), 3) for v in ...]
        //   0.0005 -> 0.0 (the float32 0.0005 times 1000 is 0.5: half to even)
        //   0.0015 -> 0.002, -0.0025 -> -0.002, 0.12345 -> 0.123, -0.16549984 -> -0.165
        assert_eq!(round3(0.0005), 0.0);
        assert_eq!(round3(0.0015), 0.002);
        assert_eq!(round3(-0.0025), -0.002);
        assert_eq!(round3(0.12345), 0.123);
        assert_eq!(round3(-0.165_499_84), -0.165);
    }

    #[test]
    fn special_care_adjusts_every_later_score() {
        // special 0 is positive (0.02): special 1 (-0.004 + 0.01) and concept 0 (-0.005 + 0.01)
        // become positive, special 1 only because it comes after special 0
        let s = concept_scores(
            &[0.52, 0.496, 0.1],
            &[0.5, 0.5, 0.5],
            &[0.195, 0.1],
            &[0.2, 0.2],
        );
        assert_eq!(s.special_scores, vec![0.02, 0.006, -0.39]);
        assert_eq!(s.concept_scores, vec![0.005, -0.09]);
        assert!(s.special_care && s.nsfw);
        // the same distances with special 0 below its threshold: nothing is adjusted
        let s = concept_scores(
            &[0.48, 0.496, 0.1],
            &[0.5, 0.5, 0.5],
            &[0.195, 0.1],
            &[0.2, 0.2],
        );
        assert_eq!(s.special_scores, vec![-0.02, -0.004, -0.4]);
        assert_eq!(s.concept_scores, vec![-0.005, -0.1]);
        assert!(!s.special_care && !s.nsfw);
    }
}
