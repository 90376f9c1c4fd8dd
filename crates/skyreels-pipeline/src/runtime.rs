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

/// Bytes of memory a new task could use on `device` now, where it can be told: on a CUDA device
/// the driver's free memory; on the CPU (Linux) the host's available memory (`MemAvailable`),
/// lowered to what is left under this process's cgroup memory limit and its address-space limit
/// (`ulimit -v`) when they are set. `None` elsewhere.
pub fn free_memory(device: &candle_core::Device) -> Option<u64> {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(dev) => dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free as u64),
        candle_core::Device::Cpu => host_free_memory(),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn host_free_memory() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    // "Name:   123 kB" lines
    let field = |text: &str, name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        kb.checked_mul(1024)
    };
    let mut free = field(&read("/proc/meminfo")?, "MemAvailable:")?;
    // cgroup v2: memory.max ("max" when unlimited) minus memory.current
    if let (Some(max), Some(current)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        if let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) {
            free = free.min(max.saturating_sub(current));
        }
    }
    if let (Some(limit), Some(status)) = (address_space_limit(), read("/proc/self/status")) {
        if let Some(used) = field(&status, "VmSize:") {
            free = free.min(limit.saturating_sub(used));
        }
    }
    Some(free)
}

#[cfg(not(target_os = "linux"))]
fn host_free_memory() -> Option<u64> {
    None
}

/// The process's address-space limit (`RLIMIT_AS`) in bytes, when one is set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn address_space_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct, which `limit` is.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

#[cfg(all(target_os = "linux", not(target_env = "gnu")))]
fn address_space_limit() -> Option<u64> {
    None
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
