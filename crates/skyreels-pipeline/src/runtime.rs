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
