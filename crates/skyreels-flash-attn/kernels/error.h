#pragma once
// FlashAttention's launch code checks every CUDA call through these two macros (PyTorch's, in the
// upstream tree). PyTorch's versions throw; ours record the first failure so the one C entry point
// (skyreels_flash.cu) returns it to Rust. Upstream's launch check reads `cudaGetLastError()`, which
// also clears the error: with a macro that ignored it, the glue's own check afterwards always saw
// success and a failed launch (e.g. kernels built for another architecture) handed back
// uninitialised memory. Here the launch check peeks instead, and nothing is dropped.

#include <cuda_runtime.h>

namespace skyreels {
// The first CUDA error seen by the checks below on this host thread since `reset_first_error`.
inline thread_local cudaError_t first_error = cudaSuccess;

inline void record(cudaError_t err) {
    if (err != cudaSuccess && first_error == cudaSuccess) {
        first_error = err;
    }
}

inline void reset_first_error() { first_error = cudaSuccess; }
}  // namespace skyreels

#define C10_CUDA_CHECK(EXPR)                 \
  do {                                       \
    const cudaError_t __err = EXPR;          \
    ::skyreels::record(__err);               \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaPeekAtLastError())
