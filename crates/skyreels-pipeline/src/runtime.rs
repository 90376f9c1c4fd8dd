//! Process-level settings for running models.

/// Keeps freed tensor memory in the process instead of returning it to the OS after every op.
///
/// CPU inference allocates and frees tensors of megabytes per op. glibc serves those with mmap
/// above 128 KiB (an adaptive threshold) and trims freed heap tops, so every op page-faults its
/// output into existence: measured 10-15% of a CPU forward pass. Raising the mmap threshold to its
/// maximum (32 MiB) and the trim threshold makes the heap reuse the memory. Call once at start-up,
/// before threads spawn; a no-op on other platforms.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; glibc rejects invalid values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    }
}

/// Bytes as GiB, for reports.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Peak memory in use on a CUDA device, sampled every 2 ms by a background thread: the whole
/// device as the driver reports it (weights, activations and what the allocator keeps pooled).
/// On other devices it measures nothing.
pub struct PeakMemory {
    #[cfg(feature = "cuda")]
    sampler: Option<Sampler>,
}

#[cfg(feature = "cuda")]
struct Sampler {
    ctx: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakMemory {
    /// Starts sampling `device` (CUDA only).
    pub fn start(device: &candle_core::Device) -> Self {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = device {
            use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
            use std::sync::Arc;
            let ctx = dev.cuda_stream().context().clone();
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(0));
            let (flag, max, sampled) = (stop.clone(), peak.clone(), ctx.clone());
            let thread = std::thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = sampled.mem_get_info() {
                        max.fetch_max((total - free) as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
            return Self {
                sampler: Some(Sampler {
                    ctx,
                    stop,
                    peak,
                    thread: Some(thread),
                }),
            };
        }
        let _ = device;
        Self {
            #[cfg(feature = "cuda")]
            sampler: None,
        }
    }

    /// Bytes in use at the peak since the start or the previous call, which starts a new
    /// interval from the memory in use now; `None` where nothing is measured.
    pub fn take(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if let Some(s) = &self.sampler {
            let now = s
                .ctx
                .mem_get_info()
                .map_or(0, |(free, total)| (total - free) as u64);
            let peak = s.peak.swap(now, std::sync::atomic::Ordering::Relaxed);
            return Some(peak.max(now));
        }
        None
    }
}

#[cfg(feature = "cuda")]
impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
