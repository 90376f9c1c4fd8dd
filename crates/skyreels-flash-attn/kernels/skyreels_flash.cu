// The one entry point SkyReels needs from FlashAttention-2: non-causal forward attention in bf16
// with head dimension 128, where sample i attends to its first seqlens_k[i] keys (the text padding
// of the joint blocks sits after the valid keys, so masking it is a per-sample key count).
//
// The per-sample key counts use FlashAttention's non-cumulative `cu_seqlens_k` mode (the one its
// KV-cache path uses): with `is_seqlens_k_cumulative = false`, cu_seqlens_k[b] is the key count of
// sample b while K and V keep their dense batch strides. Any non-null cu_seqlens_k also turns off
// the kernel's "even M/N" fast path, whose bounds checks would otherwise trust seqlen_k.

#include "flash_fwd_launch_template.h"

#include <cmath>
#include <cstring>

// Returns 0 when the kernel was launched; otherwise the first CUDA runtime error of the launch
// (a cudaError_t), or minus the device's compute capability (e.g. -80) when the kernels were
// built for another architecture. Errors inside the running kernel surface at the stream's next
// synchronisation, through candle.
extern "C" int skyreels_flash_attn_bf16_hdim128(
    const void *q, const void *k, const void *v, void *o, float *softmax_lse,
    int *seqlens_k,
    int64_t q_batch_stride, int64_t q_row_stride, int64_t q_head_stride,
    int64_t k_batch_stride, int64_t k_row_stride, int64_t k_head_stride,
    int64_t v_batch_stride, int64_t v_row_stride, int64_t v_head_stride,
    int64_t o_batch_stride, int64_t o_row_stride, int64_t o_head_stride,
    int b, int h, int seqlen_q, int seqlen_k, float softmax_scale, void *stream) {
    Flash_fwd_params params;
    memset(&params, 0, sizeof(params));

    params.q_ptr = const_cast<void *>(q);
    params.k_ptr = const_cast<void *>(k);
    params.v_ptr = const_cast<void *>(v);
    params.o_ptr = o;
    params.softmax_lse_ptr = softmax_lse;

    params.q_batch_stride = q_batch_stride;
    params.q_row_stride = q_row_stride;
    params.q_head_stride = q_head_stride;
    params.k_batch_stride = k_batch_stride;
    params.k_row_stride = k_row_stride;
    params.k_head_stride = k_head_stride;
    params.v_batch_stride = v_batch_stride;
    params.v_row_stride = v_row_stride;
    params.v_head_stride = v_head_stride;
    params.o_batch_stride = o_batch_stride;
    params.o_row_stride = o_row_stride;
    params.o_head_stride = o_head_stride;

    params.b = b;
    params.h = h;
    params.h_k = h;
    params.h_h_k_ratio = 1;
    params.seqlen_q = seqlen_q;
    params.seqlen_k = seqlen_k;
    params.seqlen_q_rounded = (seqlen_q + 127) / 128 * 128;
    params.seqlen_k_rounded = (seqlen_k + 127) / 128 * 128;
    params.total_q = b * seqlen_q;
    params.d = 128;
    params.d_rounded = 128;

    params.scale_softmax = softmax_scale;
    params.scale_softmax_log2 = softmax_scale * float(M_LOG2E);
    params.softcap = 0.0f;

    // no dropout: keep probability 1
    params.p_dropout = 1.0f;
    params.p_dropout_in_uint8_t = 255;
    params.rp_dropout = 1.0f;
    params.scale_softmax_rp_dropout = softmax_scale;

    params.is_bf16 = true;
    params.is_causal = false;
    params.window_size_left = -1;
    params.window_size_right = -1;

    params.cu_seqlens_q = nullptr;
    params.cu_seqlens_k = seqlens_k;
    params.is_seqlens_k_cumulative = false;
    params.seqused_k = nullptr;
    params.block_table = nullptr;
    params.page_block_size = -1;
    params.num_splits = 1;
    params.unpadded_lse = false;

    // A kernel image for another architecture fails the launch with "no kernel image"; say so
    // before launching, with both capabilities (SKYREELS_SM: the build's CUDA_COMPUTE_CAP). The
    // machine code of sm_XY runs on sm_XZ for Z >= Y only.
    int device = 0, major = 0, minor = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (major != SKYREELS_SM / 10 || minor < SKYREELS_SM % 10) {
        return -(major * 10 + minor);  // the Rust side names both architectures
    }

    cudaGetLastError();  // clear a stale (non-sticky) error so what follows is about this launch
    skyreels::reset_first_error();
    run_mha_fwd_<cutlass::bfloat16_t, 128, false>(params, reinterpret_cast<cudaStream_t>(stream));
    err = skyreels::first_error;
    const cudaError_t last = cudaGetLastError();
    return static_cast<int>(err != cudaSuccess ? err : last);
}

// The runtime's name and description of a CUDA error code, for the Rust side's message.
extern "C" const char *skyreels_flash_attn_error_name(int code) {
    return cudaGetErrorName(static_cast<cudaError_t>(code));
}

extern "C" const char *skyreels_flash_attn_error_string(int code) {
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
