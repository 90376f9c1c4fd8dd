//! A pipeline's LoRAs: chosen per request with [`Pipeline::set_loras`], attached to every copy
//! of the transformer (resident, `--parallel` ranks, and each one `--offload model` loads).

use super::*;
use crate::lora::{attach, LoraCacheStats, LoraFile, LoraReport, Matched};

impl Pipeline {
    /// Replaces the LoRAs of every transformer with `loras` (in order; empty: none, so the
    /// layers run exactly their plain code). All or nothing: on an error no adapter changes.
    /// Files come from the cache when their bytes were parsed before.
    pub fn set_loras(&mut self, loras: &[LoraFile]) -> Result<LoraReport, GenerateError> {
        let (matched, report) = self.loras.select(loras)?;
        let adapters = matched.adapters(self.dtype, &self.device)?;
        let ranks = self.rank_adapters(&matched, &adapters)?;
        if let Resident::Loaded(model) = &mut self.transformer {
            attach(model, &adapters);
        }
        let models = self
            .parallel
            .cond
            .iter_mut()
            .chain(&mut self.parallel.uncond);
        for ((_, model), adapters) in models.zip(&ranks) {
            attach(model, adapters);
        }
        self.matched = matched;
        self.adapters = adapters;
        Ok(report)
    }

    /// The adapters of each `--parallel` rank (`cond` then `uncond`), on its device.
    pub(super) fn rank_adapters(
        &self,
        matched: &Matched,
        main: &Adapters,
    ) -> Result<Vec<Adapters>, GenerateError> {
        let devices = self.parallel.cond.iter().chain(&self.parallel.uncond);
        devices
            .map(|(device, _)| self.adapters_on(matched, main, device))
            .collect()
    }

    /// `matched`'s adapters on `device`: `main` (those on the pipeline's device) shared when it
    /// is that device, else placed there.
    pub(super) fn adapters_on(
        &self,
        matched: &Matched,
        main: &Adapters,
        device: &Device,
    ) -> Result<Adapters, GenerateError> {
        Ok(if device.same_device(&self.device) {
            main.clone()
        } else {
            matched.adapters(self.dtype, device)?
        })
    }

    /// Bytes of parsed LoRA tensors kept between requests (least recently used out first).
    pub fn set_lora_cache_bytes(&mut self, bytes: usize) {
        self.loras.set_cache_bytes(bytes);
    }

    pub fn lora_cache_stats(&self) -> LoraCacheStats {
        self.loras.cache_stats()
    }
}
