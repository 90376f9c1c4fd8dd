//! 3D convolution built from 2D convolutions over temporal taps (candle has no conv3d).
//!
//! out[:, :, t] = bias + sum_i conv2d(x[:, :, t*stride_t + i], weight[:, :, i]), with time folded
//! into the batch dimension for every tap. No implicit padding: callers (the VAE's causal
//! convolution) pad explicitly, exactly as the reference does.

use super::cpu::{conv3d_f32, Conv3dGeometry};
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    /// (t, h, w) stride; the spatial strides must be equal (candle's conv2d takes one stride).
    pub stride: (usize, usize, usize),
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Self { stride: (1, 1, 1) }
    }
}

#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    cfg: Conv3dConfig,
}

impl Conv3d {
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>, cfg: Conv3dConfig) -> Result<Self> {
        let (_, _, _, _, _) = weight.dims5()?;
        if cfg.stride.1 != cfg.stride.2 {
            bail!(
                "conv3d: unequal spatial strides {:?} are not supported",
                cfg.stride
            )
        }
        if cfg.stride.0 == 0 || cfg.stride.1 == 0 {
            bail!("conv3d: zero stride {:?}", cfg.stride)
        }
        Ok(Self { weight, bias, cfg })
    }

    /// Loads `weight` [out, in, kt, kh, kw] and `bias` [out] from `vb`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize, usize),
        cfg: Conv3dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get(
            (out_channels, in_channels, kernel.0, kernel.1, kernel.2),
            "weight",
        )?;
        let bias = vb.get(out_channels, "bias")?;
        Self::from_tensors(weight, Some(bias), cfg)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Patch embedding fast path: kernel == stride and no overlap is a reshape + matmul.
    fn forward_patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (o, c, kt, kh, kw) = self.weight.dims5()?;
        let (b, _, t, h, w) = x.dims5()?;
        let (nt, nh, nw) = (t / kt, h / kh, w / kw);
        let x = x
            .narrow(2, 0, nt * kt)?
            .narrow(3, 0, nh * kh)?
            .narrow(4, 0, nw * kw)?;
        // (b, c, nt*kt, nh*kh, nw*kw) -> (b, c, nt, kt, nh, kh, nw, kw)
        let x = x.reshape(vec![b, c, nt, kt, nh, kh, nw, kw])?;
        // -> (b, nt, nh, nw, c, kt, kh, kw) -> (b*nt*nh*nw, c*kt*kh*kw)
        let x = x
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b * nt * nh * nw, c * kt * kh * kw))?;
        let wm = self.weight.reshape((o, c * kt * kh * kw))?;
        let y = x.matmul(&wm.t()?)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        // (b*nt*nh*nw, o) -> (b, nt, nh, nw, o) -> (b, o, nt, nh, nw)
        y.reshape((b, nt, nh, nw, o))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }
}

impl Conv3d {
    /// The convolution of x replicate-padded by `pad` = (frames in front, rows on both sides,
    /// columns on both sides), without materializing the padded input on the CPU in f32.
    pub fn forward_padded(&self, x: &Tensor, pad: (usize, usize, usize)) -> Result<Tensor> {
        self.forward_upsampled(x, (1, 1, 1), pad)
    }

    /// The convolution of [`upsample_causal`]`(x, factors)` replicate-padded by `pad` (as
    /// [`Self::forward_padded`]). On the CPU in f32 neither the upsampled nor the padded input
    /// is built and taps reading the same input sample are merged (see
    /// `cpu::conv`); elsewhere it upsamples, pads and convolves.
    pub fn forward_upsampled(
        &self,
        x: &Tensor,
        factors: (usize, usize, usize),
        pad: (usize, usize, usize),
    ) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            let geo = Conv3dGeometry {
                stride: self.cfg.stride,
                pad,
                upsample: factors,
            };
            return conv3d_f32(x, &self.weight, self.bias.as_ref(), geo);
        }
        let x = if factors == (1, 1, 1) {
            x.clone()
        } else {
            upsample_causal(x, factors)?
        };
        let (pt, ph, pw) = pad;
        // (b, c, t, h, w): replicate-pad w, h, then t on the front
        let x = x
            .pad_with_same(4, pw, pw)?
            .pad_with_same(3, ph, ph)?
            .pad_with_same(2, pt, 0)?;
        self.forward(&x)
    }
}

/// Nearest-neighbour upsampling of (b, c, t, h, w) by integer factors (t, h, w), the first frame
/// spatially only (HunyuanVideo's causal upsampler: t frames become 1 + ft·(t − 1)).
pub fn upsample_causal(x: &Tensor, (ft, fh, fw): (usize, usize, usize)) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    if t == 0 || ft == 0 || fh == 0 || fw == 0 {
        bail!("upsample: input {:?} by {:?}", x.shape(), (ft, fh, fw))
    }
    // (b, c, t, 1, h, 1, w, 1) -> (b, c, t, ft, h, fh, w, fw) -> (b, c, t·ft, h·fh, w·fw)
    let nearest = |x: &Tensor, ft: usize| {
        let t = x.dim(2)?;
        x.reshape(vec![b, c, t, 1, h, 1, w, 1])?
            .broadcast_as(vec![b, c, t, ft, h, fh, w, fw])?
            .contiguous()?
            .reshape((b, c, t * ft, h * fh, w * fw))
    };
    let first = nearest(&x.narrow(2, 0, 1)?, 1)?;
    if t == 1 {
        return Ok(first);
    }
    Tensor::cat(&[first, nearest(&x.narrow(2, 1, t - 1)?, ft)?], 2)
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, c_w, kt, kh, kw) = self.weight.dims5()?;
        let (b, c, t, h, w) = x.dims5()?;
        if c != c_w {
            bail!(
                "conv3d: input {:?} has {c} channels, weight {:?} expects {c_w}",
                x.shape(),
                self.weight.shape()
            )
        }
        if t < kt || h < kh || w < kw {
            bail!(
                "conv3d: input {:?} is smaller than kernel {:?}",
                x.shape(),
                self.weight.shape()
            )
        }
        let (st, ss, _) = self.cfg.stride;
        if (st, ss) == (kt, kh) && kh == kw {
            return self.forward_patchify(x);
        }
        if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
            // the fused CPU kernels, without padding or upsampling
            return self.forward_upsampled(x, (1, 1, 1), (0, 0, 0));
        }
        let t_out = (t - kt) / st + 1;
        // (b, c, t, h, w) -> (b, t, c, h, w), so that frames fold into the batch
        let xt = x.permute((0, 2, 1, 3, 4))?.contiguous()?;
        let mut acc: Option<Tensor> = None;
        for i in 0..kt {
            let frames = if st == 1 {
                xt.narrow(1, i, t_out)?
            } else {
                let idx: Vec<u32> = (0..t_out).map(|j| (i + j * st) as u32).collect();
                let idx = Tensor::new(idx.as_slice(), x.device())?;
                xt.index_select(&idx, 1)?
            };
            // (b, t_out, c, h, w) -> (b*t_out, c, h, w)
            let frames = frames.contiguous()?.reshape((b * t_out, c, h, w))?;
            let w_i = self.weight.narrow(2, i, 1)?.squeeze(2)?.contiguous()?;
            let y = frames.conv2d(&w_i, 0, ss, 1, 1)?;
            acc = Some(match acc {
                None => y,
                Some(a) => (a + y)?,
            });
        }
        let y = acc.expect("kt >= 1 by the dims check");
        let (_, _, ho, wo) = y.dims4()?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?)?,
            None => y,
        };
        // (b*t_out, o, ho, wo) -> (b, t_out, o, ho, wo) -> (b, o, t_out, ho, wo)
        y.reshape((b, t_out, o, ho, wo))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Direct 5-loop reference convolution.
    fn conv3d_naive(x: &Tensor, w: &Tensor, b: &Tensor, s: (usize, usize, usize)) -> Tensor {
        let (n, c, t, h, wd) = x.dims5().unwrap();
        let (o, _, kt, kh, kw) = w.dims5().unwrap();
        let (to, ho, wo) = ((t - kt) / s.0 + 1, (h - kh) / s.1 + 1, (wd - kw) / s.2 + 1);
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = b.to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; n * o * to * ho * wo];
        for ni in 0..n {
            for oi in 0..o {
                for ti in 0..to {
                    for hi in 0..ho {
                        for wi in 0..wo {
                            let mut acc = bv[oi];
                            for ci in 0..c {
                                for a in 0..kt {
                                    for bb in 0..kh {
                                        for cc in 0..kw {
                                            let xi = (((ni * c + ci) * t + ti * s.0 + a) * h
                                                + hi * s.1
                                                + bb)
                                                * wd
                                                + wi * s.2
                                                + cc;
                                            let wi_ =
                                                (((oi * c + ci) * kt + a) * kh + bb) * kw + cc;
                                            acc += xv[xi] * wv[wi_];
                                        }
                                    }
                                }
                            }
                            out[(((ni * o + oi) * to + ti) * ho + hi) * wo + wi] = acc;
                        }
                    }
                }
            }
        }
        Tensor::from_vec(out, (n, o, to, ho, wo), &Device::Cpu).unwrap()
    }

    /// Largest |a − b|, computed in f64.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let d = (f64s(a) - f64s(b)).unwrap().abs().unwrap();
        d.max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// Checks (in, out) channels `chans` with the given kernel, stride and input frames × rows ×
    /// columns against the naive loop.
    fn check(
        chans: (usize, usize),
        kernel: (usize, usize, usize),
        stride: (usize, usize, usize),
        dims: (usize, usize, usize),
    ) {
        let dev = Device::Cpu;
        let (c, o) = chans;
        let x = Tensor::randn(0f32, 1., (2, c, dims.0, dims.1, dims.2), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (o, c, kernel.0, kernel.1, kernel.2), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
        let conv =
            Conv3d::from_tensors(w.clone(), Some(b.clone()), Conv3dConfig { stride }).unwrap();
        let got = conv.forward(&x).unwrap();
        let want = conv3d_naive(&x, &w, &b, stride);
        assert_eq!(got.dims(), want.dims());
        let err = max_abs_diff(&got, &want);
        // Summation order (and FMA) differ from the naive loop only: f32 rounding of sums of up
        // to 27·37 unit-variance terms (magnitude ~30, rounding ~1e-5 relative).
        let tol = 2e-4 * (c as f64).sqrt();
        assert!(
            err < tol,
            "kernel {kernel:?} stride {stride:?}: max abs err {err}"
        );
        // f64 takes the generic path (2D convolutions over temporal taps)
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let conv64 =
            Conv3d::from_tensors(f64s(&w), Some(f64s(&b)), Conv3dConfig { stride }).unwrap();
        let got64 = conv64.forward(&f64s(&x)).unwrap();
        let err = max_abs_diff(&got64, &want);
        assert!(err < tol, "generic path, kernel {kernel:?}: {err}");
        // replicate padding inside the kernel equals padding the input first
        if kernel.0 == 3 {
            let pad = (2, 1, 1);
            let padded = x
                .pad_with_same(4, 1, 1)
                .unwrap()
                .pad_with_same(3, 1, 1)
                .unwrap();
            let padded = padded.pad_with_same(2, 2, 0).unwrap();
            let want = conv3d_naive(&padded, &w, &b, stride);
            let got = conv.forward_padded(&x, pad).unwrap();
            let err = max_abs_diff(&got, &want);
            // as above; with unit strides the taps that read the replicated first frame are
            // merged (weights summed first), another change of summation order only
            assert!(err < tol, "padded, stride {stride:?}: {err}");
        }
    }

    #[test]
    fn matches_naive_convolution() {
        check((3, 4), (3, 3, 3), (1, 1, 1), (5, 6, 7));
        check((3, 4), (3, 3, 3), (2, 2, 2), (5, 7, 9));
        check((3, 4), (3, 3, 3), (1, 2, 2), (4, 7, 8));
        check((3, 4), (1, 1, 1), (1, 1, 1), (2, 3, 4));
        // Winograd (unit stride, 3x3 spatial taps) with several bands of tile rows (the last
        // one partial), odd and even output sizes, a single tile row
        check((37, 13), (3, 3, 3), (1, 1, 1), (4, 17, 23));
        check((5, 7), (3, 3, 3), (1, 1, 1), (3, 3, 4));
        check((5, 7), (2, 3, 3), (1, 1, 1), (3, 4, 3));
        // the direct kernel (other unit-stride kernels) with several channel blocks, a partial
        // output-channel group and several tasks per frame (the last one partial)
        check((37, 13), (1, 1, 1), (1, 1, 1), (2, 9, 30));
        check((37, 13), (2, 1, 3), (1, 1, 1), (3, 9, 30));
        // patchify fast path, including sizes that do not divide evenly
        check((3, 4), (1, 2, 2), (1, 2, 2), (3, 4, 6));
        check((3, 4), (2, 2, 2), (2, 2, 2), (5, 5, 7));
    }

    #[test]
    fn upsampling_keeps_the_first_frame_single() {
        let x = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 1, 2))
            .unwrap();
        let up = upsample_causal(&x, (2, 2, 2)).unwrap();
        assert_eq!(up.dims(), &[1, 1, 5, 2, 4]);
        let frames: Vec<Vec<f32>> = (0..5)
            .map(|t| {
                let f = up.narrow(2, t, 1).unwrap().flatten_all().unwrap();
                f.to_vec1::<f32>().unwrap()
            })
            .collect();
        let [a, b, c] = [[0f32, 0., 1., 1.], [2., 2., 3., 3.], [4., 4., 5., 5.]];
        for (got, want) in frames.iter().zip([a, b, b, c, c]) {
            // both rows of a frame repeat the source row
            assert_eq!(got[..4], want);
            assert_eq!(got[4..], want);
        }
    }

    /// The fused upsampling convolution (CPU f32) and the generic path (f64) against the naive
    /// loop over the explicitly upsampled and padded input.
    #[test]
    fn upsampled_convolution_matches_upsampling_first() {
        let dev = Device::Cpu;
        // (in, out) channels, kernel, (t, h, w) factors, padding, input (t, h, w)
        #[allow(clippy::type_complexity)]
        let cases: [((usize, usize), (usize, usize, usize), _, _, _); 8] = [
            // HunyuanVideo's upsamplers: 3x3x3 causal, by 2 in space and time, space only,
            // time only (channels crossing the kernel's channel block and output group)
            ((37, 13), (3, 3, 3), (2, 2, 2), (2, 1, 1), (3, 5, 9)),
            ((37, 13), (3, 3, 3), (1, 2, 2), (2, 1, 1), (2, 6, 7)),
            ((5, 7), (3, 3, 3), (2, 1, 1), (2, 1, 1), (4, 5, 6)),
            // a single frame; then other kernels, paddings and factors
            ((5, 7), (3, 3, 3), (2, 2, 2), (2, 1, 1), (1, 4, 5)),
            ((5, 7), (1, 1, 1), (2, 2, 2), (0, 0, 0), (3, 3, 4)),
            ((5, 7), (3, 3, 3), (2, 2, 2), (0, 0, 0), (3, 3, 4)),
            ((5, 7), (3, 3, 3), (2, 2, 2), (1, 2, 2), (2, 3, 4)),
            ((5, 7), (2, 3, 2), (3, 3, 2), (1, 1, 0), (3, 3, 4)),
        ];
        for ((c, o), kernel, factors, (pt, ph, pw), dims) in cases {
            let x = Tensor::randn(0f32, 1., (2, c, dims.0, dims.1, dims.2), &dev).unwrap();
            let w = Tensor::randn(0f32, 1., (o, c, kernel.0, kernel.1, kernel.2), &dev).unwrap();
            let b = Tensor::randn(0f32, 1., o, &dev).unwrap();
            let padded = upsample_causal(&x, factors)
                .unwrap()
                .pad_with_same(4, pw, pw)
                .unwrap()
                .pad_with_same(3, ph, ph)
                .unwrap()
                .pad_with_same(2, pt, 0)
                .unwrap();
            let want = conv3d_naive(&padded, &w, &b, (1, 1, 1));
            let conv =
                Conv3d::from_tensors(w.clone(), Some(b.clone()), Conv3dConfig::default()).unwrap();
            let got = conv.forward_upsampled(&x, factors, (pt, ph, pw)).unwrap();
            assert_eq!(got.dims(), want.dims(), "{factors:?} {kernel:?}");
            let err = max_abs_diff(&got, &want);
            // as in `check`: summation order (here also summed weights of merged taps)
            let tol = 2e-4 * (c as f64).sqrt();
            assert!(
                err < tol,
                "{factors:?} {kernel:?} pad {:?}: {err}",
                (pt, ph, pw)
            );
            let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let conv64 =
                Conv3d::from_tensors(f64s(&w), Some(f64s(&b)), Conv3dConfig::default()).unwrap();
            let got64 = conv64
                .forward_upsampled(&f64s(&x), factors, (pt, ph, pw))
                .unwrap();
            let err = max_abs_diff(&got64, &want);
            assert!(err < tol, "generic path {factors:?}: {err}");
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 3, 3, 3, 3), DType::F32, &dev).unwrap();
        let conv = Conv3d::from_tensors(w, None, Conv3dConfig::default()).unwrap();
        let x = Tensor::zeros((1, 2, 3, 3, 3), DType::F32, &dev).unwrap();
        let e = conv.forward(&x).unwrap_err().to_string();
        assert!(e.contains("channels"), "{e}");
        let x = Tensor::zeros((1, 3, 2, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv.forward(&x).is_err());
    }
}
