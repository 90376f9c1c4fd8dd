use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use std::ffi::{c_int, c_void};

/// The head dimension the kernel is compiled for (SkyReels: 24 heads of 128).
const HEAD_DIM: usize = 128;

extern "C" {
    fn skyreels_flash_attn_bf16_hdim128(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *mut c_void,
        softmax_lse: *mut f32,
        seqlens_k: *mut c_int,
        q_batch_stride: i64,
        q_row_stride: i64,
        q_head_stride: i64,
        k_batch_stride: i64,
        k_row_stride: i64,
        k_head_stride: i64,
        v_batch_stride: i64,
        v_row_stride: i64,
        v_head_stride: i64,
        o_batch_stride: i64,
        o_row_stride: i64,
        o_head_stride: i64,
        b: c_int,
        h: c_int,
        seqlen_q: c_int,
        seqlen_k: c_int,
        softmax_scale: f32,
        stream: *mut c_void,
    ) -> c_int;
}

/// Whether [`flash_attn`] handles these inputs: bf16 tensors on a CUDA device, rank 4 with head
/// dimension 128, v shaped like k, and sizes that fit the kernel's 32-bit counts. Callers fall
/// back to an exact generic path otherwise.
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let fits = |t: &Tensor| t.dims().iter().all(|&d| d <= i32::MAX as usize);
    q.device().is_cuda()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && fits(t))
        && q.rank() == 4
        && q.dim(3).is_ok_and(|d| d == HEAD_DIM)
        && k.dims() == v.dims()
}

/// softmax(q kᵀ · scale) v for q (b, nq, h, 128), k and v (b, nk, h, 128), all bf16 on one CUDA
/// device (strided layouts are fine; a non-contiguous last dimension is copied); sample `i`
/// attends to its first `key_counts[i]` keys. Returns (b, nq, h, 128) bf16. Softmax statistics are kept in f32 inside the kernel.
pub fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_counts: &[usize],
    scale: f32,
) -> Result<Tensor> {
    let (b, nq, h, d) = q.dims4()?;
    let (kb, nk, kh, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || d != HEAD_DIM {
        bail!(
            "flash_attn: needs q (b, nq, h, {HEAD_DIM}) and k = v (b, nk, h, {HEAD_DIM}); got q {:?}, k {:?}, v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if nq == 0 || key_counts.len() != b || key_counts.iter().any(|&c| c == 0 || c > nk) {
        bail!("flash_attn: key counts {key_counts:?} invalid for {b} samples of {nk} keys")
    }
    // the kernel reads rows with strides but needs each head vector contiguous
    let [q, k, v] = [q, k, v].map(|t| {
        if t.stride().last() == Some(&1) {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    });
    let op = FlashAttn {
        key_counts: key_counts.iter().map(|&c| c as c_int).collect(),
        scale,
    };
    q?.apply_op3_no_bwd(&k?, &v?, &op)
}

struct FlashAttn {
    key_counts: Vec<c_int>,
    scale: f32,
}

/// Element strides (batch, row, head) of a rank-4 (b, n, h, d) layout with contiguous d.
fn strides(l: &Layout, what: &str) -> Result<[i64; 3]> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        bail!("flash_attn: {what} needs a contiguous last dimension, strides {s:?}")
    }
    Ok([s[0] as i64, s[1] as i64, s[2] as i64])
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "skyreels-flash-attn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("flash_attn runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        q_l: &Layout,
        k: &CudaStorage,
        k_l: &Layout,
        v: &CudaStorage,
        v_l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        for (s, what) in [(q, "q"), (k, "k"), (v, "v")] {
            if s.dtype() != DType::BF16 {
                bail!("flash_attn: {what} is {:?}, the kernel is bf16", s.dtype())
            }
        }
        let (b, nq, h, _) = q_l.shape().dims4()?;
        let nk = k_l.shape().dims4()?.1;
        let [qb, qr, qh] = strides(q_l, "q")?;
        let [kb, kr, kh] = strides(k_l, "k")?;
        let [vb, vr, vh] = strides(v_l, "v")?;
        let out_shape = q_l.shape().clone();
        // output (b, nq, h, d) contiguous
        let (ob, or, oh) = (
            (nq * h * HEAD_DIM) as i64,
            (h * HEAD_DIM) as i64,
            HEAD_DIM as i64,
        );

        let dev = q.device().clone();
        let stream = dev.cuda_stream();
        let qs = q.as_cuda_slice::<bf16>()?.slice(q_l.start_offset()..);
        let ks = k.as_cuda_slice::<bf16>()?.slice(k_l.start_offset()..);
        let vs = v.as_cuda_slice::<bf16>()?.slice(v_l.start_offset()..);
        // SAFETY: the kernel writes every element of the output.
        let mut out = unsafe { dev.alloc::<bf16>(out_shape.elem_count())? };
        let mut lse = dev.alloc_zeros::<f32>(b * h * nq)?;
        let mut seqlens = dev.clone_htod(&self.key_counts)?;
        let code = {
            let (q_ptr, _gq) = qs.device_ptr(&stream);
            let (k_ptr, _gk) = ks.device_ptr(&stream);
            let (v_ptr, _gv) = vs.device_ptr(&stream);
            let (o_ptr, _go) = out.device_ptr_mut(&stream);
            let (lse_ptr, _gl) = lse.device_ptr_mut(&stream);
            let (seq_ptr, _gs) = seqlens.device_ptr_mut(&stream);
            // SAFETY: every pointer is a live allocation on `stream` of the size the strides and
            // shapes above describe (checked by `flash_attn` and the layouts); the guards keep
            // them alive and ordered on the stream the kernel is launched on.
            unsafe {
                skyreels_flash_attn_bf16_hdim128(
                    q_ptr as *const c_void,
                    k_ptr as *const c_void,
                    v_ptr as *const c_void,
                    o_ptr as *mut c_void,
                    lse_ptr as *mut f32,
                    seq_ptr as *mut c_int,
                    qb,
                    qr,
                    qh,
                    kb,
                    kr,
                    kh,
                    vb,
                    vr,
                    vh,
                    ob,
                    or,
                    oh,
                    b as c_int,
                    h as c_int,
                    nq as c_int,
                    nk as c_int,
                    self.scale,
                    stream.cu_stream() as *mut c_void,
                )
            }
        };
        if code != 0 {
            bail!("flash_attn: kernel launch failed with CUDA runtime error {code}")
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
    }
}
