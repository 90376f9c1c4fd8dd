use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use std::ffi::{c_char, c_int, c_void, CStr};

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
    fn skyreels_flash_attn_error_name(code: c_int) -> *const c_char;
    fn skyreels_flash_attn_error_string(code: c_int) -> *const c_char;
}

/// The compute capability the kernels were built for (`CUDA_COMPUTE_CAP` at build time).
const BUILT_FOR: &str = env!("SKYREELS_FLASH_ATTN_SM");

/// What a non-zero return of the entry point means, in words.
fn launch_error(code: c_int) -> String {
    if code < 0 {
        let sm = -code;
        return format!(
            "flash_attn: the kernels were built for compute capability {BUILT_FOR} \
             (CUDA_COMPUTE_CAP={BUILT_FOR}) but this GPU is {sm}; rebuild with \
             CUDA_COMPUTE_CAP={sm} (see scripts/setup_cuda.sh)"
        );
    }
    let text = |p: *const c_char| {
        if p.is_null() {
            "unknown".to_string()
        } else {
            // SAFETY: the CUDA runtime returns static NUL-terminated strings for any code.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: both take any integer and return a static string (or null).
    let (name, what) = unsafe {
        (
            text(skyreels_flash_attn_error_name(code)),
            text(skyreels_flash_attn_error_string(code)),
        )
    };
    format!("flash_attn: the kernel launch failed: {name} ({code}): {what}")
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
        // the launch grid's y and z dimensions are the batch and the heads (at most 65535)
        && q.dims()[0] <= GRID_YZ
        && q.dims()[2] <= GRID_YZ
}

/// The largest y and z dimension of a CUDA launch grid.
const GRID_YZ: usize = 65535;

/// softmax(q kᵀ · scale) v for q (b, nq, h, 128), k and v (b, nk, h, 128), all bf16 on one CUDA
/// device (strided layouts are fine; one the kernel cannot read in place, see
/// [`crate::reads_in_place`], is copied); sample `i` attends to its first `key_counts[i]` keys.
/// Returns (b, nq, h, 128) bf16. Softmax statistics are kept in f32 inside the kernel. A failed
/// launch (kernels built for another GPU, a grid past CUDA's limits: check [`supports`]) is an
/// error naming the CUDA error, never an uninitialised output.
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
    let [q, k, v] = [q, k, v].map(|t| {
        if crate::reads_in_place(t.layout().start_offset(), t.stride()) {
            Ok(t.clone())
        } else {
            // a fresh allocation at offset 0, contiguous: strides are multiples of 128
            t.force_contiguous()
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

/// Element strides (batch, row, head) of a rank-4 (b, n, h, d) layout the kernel reads in place
/// (`flash_attn` copies any other).
fn strides(l: &Layout, what: &str) -> Result<[i64; 3]> {
    let s = l.stride();
    if !crate::reads_in_place(l.start_offset(), s) {
        bail!(
            "flash_attn: {what} (offset {}, strides {s:?}) is not 16-byte aligned with a contiguous last dimension",
            l.start_offset()
        )
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
            // offsets were checked; this guards the allocation's own alignment
            if [q_ptr, k_ptr, v_ptr].iter().any(|p| !p.is_multiple_of(16)) {
                bail!("flash_attn: an input's device address is not 16-byte aligned")
            }
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
            bail!("{}", launch_error(code))
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), out_shape))
    }
}
