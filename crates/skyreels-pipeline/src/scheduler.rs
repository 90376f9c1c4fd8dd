//! diffusers' `FlowMatchEulerDiscreteScheduler` as the HunyuanVideo pipelines drive it
//! (docs/MODEL.md section 4.1): explicit sigmas `linspace(1, 0, N + 1)[:-1]`, the static shift of
//! `scheduler_config.json` (or a request's `flow_shift`), timesteps = sigma × num_train_timesteps,
//! and the Euler step.
//!
//! <https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py#L48-L662>

use crate::loading::LoadError;
use candle_core::{DType, Result, Tensor};
use serde::Deserialize;
use std::path::Path;

/// The fields of `scheduler_config.json` that matter; options this scheduler does not implement
/// are read so that a config enabling them is refused instead of silently ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_shift")]
    pub shift: f64,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
}

fn default_shift() -> f64 {
    1.0
}

fn default_train_steps() -> usize {
    1000
}

impl Default for SchedulerConfig {
    /// The class defaults (shift 1.0); the HunyuanVideo repo's config sets shift 7.0.
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json` from `dir` or `dir/scheduler/`.
    pub fn from_dir(dir: &Path) -> std::result::Result<Self, LoadError> {
        let path = [
            dir.join("scheduler_config.json"),
            dir.join("scheduler").join("scheduler_config.json"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| LoadError::NoConfig(dir.to_path_buf(), "scheduler".into()))?;
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| LoadError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        cfg.validate()
            .map_err(|message| LoadError::Config { path, message })?;
        Ok(cfg)
    }

    /// The config a request runs with: its `flow_shift` in place of the file's `shift`, if it
    /// gives one (diffusers' `FlowMatchEulerDiscreteScheduler.from_config(config, shift=S)`).
    pub fn with_shift(&self, shift: Option<f64>) -> Self {
        Self {
            shift: shift.unwrap_or(self.shift),
            ..self.clone()
        }
    }

    /// Refuses options the HunyuanVideo pipelines cannot run with (dynamic shifting needs a `mu`
    /// they never pass) or that this scheduler does not implement.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let unsupported = [
            ("use_dynamic_shifting", self.use_dynamic_shifting),
            ("shift_terminal", self.shift_terminal.is_some()),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("invert_sigmas", self.invert_sigmas),
            ("stochastic_sampling", self.stochastic_sampling),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(format!(
                "`{name}` is not supported by the flow-match Euler sampler"
            ));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(format!("`shift` must be positive, got {}", self.shift));
        }
        if self.num_train_timesteps == 0 {
            return Err("`num_train_timesteps` must be positive".into());
        }
        Ok(())
    }
}

/// The sigma schedule of one generation and its Euler steps.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    /// N + 1 sigmas, the last one 0.
    sigmas: Vec<f32>,
    /// N timesteps, sigma × num_train_timesteps.
    timesteps: Vec<f32>,
}

impl FlowMatchEuler {
    /// The schedule for `steps` denoising steps, in the reference's float32 arithmetic.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Self {
        let shift = cfg.shift as f32;
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                // np.linspace(1, 0, N + 1) in float64, then cast to float32
                let s = 1.0 - i as f64 / steps as f64;
                let s = s as f32;
                shift * s / (1.0 + (shift - 1.0) * s)
            })
            .collect();
        let train = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|s| s * train).collect();
        sigmas.push(0.0);
        Self { sigmas, timesteps }
    }

    pub fn steps(&self) -> usize {
        self.timesteps.len()
    }

    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Euler step `i`: `sample + (sigma[i+1] - sigma[i]) · v`, with the sample upcast to f32, the
    /// product in v's dtype (PyTorch's promotion with a 0-dim f32 tensor) and the result cast
    /// back to v's dtype.
    ///
    /// <https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py#L423-L522>
    pub fn step(&self, i: usize, v: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let dv = v.affine(dt as f64, 0.0)?;
        let next = (sample.to_dtype(DType::F32)? + dv.to_dtype(DType::F32)?)?;
        next.to_dtype(v.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/MODEL.md 4.1: the 30 timesteps of the hub config (shift 7), printed by diffusers.
    #[test]
    fn thirty_steps_with_shift_seven_match_diffusers() {
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"shift": 7.0}"#).unwrap();
        let s = FlowMatchEuler::new(&cfg, 30);
        let want = [
            1000.0, 995.0981, 989.899, 984.375, 978.4946, 972.2222, 965.5172, 958.3334, 950.6172,
            942.3078, 933.3334, 923.6111, 913.0435, 901.5151, 888.8889, 875.0, 859.6491, 842.5926,
            823.5294, 802.0833, 777.7778, 750.0, 717.9487, 680.5555, 636.3636, 583.3334, 518.5185,
            437.5, 333.3333, 194.4444,
        ];
        assert_eq!(s.steps(), 30);
        for (got, want) in s.timesteps().iter().zip(want) {
            // the printed values carry 7 significant digits
            assert!((got - want).abs() <= 1e-4 * want, "{got} vs {want}");
        }
        assert_eq!(s.sigmas().len(), 31);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
    }

    #[test]
    fn a_request_shift_replaces_the_configs() {
        let cfg: SchedulerConfig = serde_json::from_str(r#"{"shift": 7.0}"#).unwrap();
        assert_eq!(cfg.with_shift(None).shift, 7.0);
        let shifted = cfg.with_shift(Some(3.0));
        assert_eq!(shifted.shift, 3.0);
        assert_eq!(shifted.num_train_timesteps, 1000);
        // shift·s / (1 + (shift − 1)·s) at s = 0.5: 3/4 with shift 3, 7/8 with 7
        let half = |c: &SchedulerConfig| FlowMatchEuler::new(c, 2).sigmas()[1];
        assert_eq!((half(&shifted), half(&cfg)), (0.75, 0.875));
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let cfg: SchedulerConfig =
            serde_json::from_str(r#"{"shift": 7.0, "use_karras_sigmas": true}"#).unwrap();
        assert!(cfg.validate().unwrap_err().contains("use_karras_sigmas"));
        assert!(SchedulerConfig::default().validate().is_ok());
    }
}
