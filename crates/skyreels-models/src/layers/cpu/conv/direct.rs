//! The direct convolution for unit strides, with the input upsampling folded in: register tiles
//! of output channels × positions accumulated over packed weights of merged taps.

use super::bias_values;
use super::im2col::im2col_row;
use super::taps::{frame_taps, frames_to_load, Axis};
use crate::layers::cpu::{with_f32s, SharedMut};
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;

/// Register tile of [`conv_tile`]: output channels × vectors of [`CONV_VL`] positions. 6 × 2
/// keeps 12 vector accumulators in registers (of 16 with AVX2) and costs 2 loads and 6
/// broadcasts per 12 FMAs, so the loop is bound by FMA throughput. (4 × 3 needs one more register
/// than LLVM leaves free and spills.)
const CONV_TO: usize = 6;
const CONV_TV: usize = 2;
const CONV_VL: usize = 8;
/// Output positions per register tile.
const CONV_TN: usize = CONV_TV * CONV_VL;
/// Input channels per pass over a task's tiles: the packed weights of one channel group
/// (CONV_CB · taps · CONV_TO floats, 13.5 KiB for 3×3×3) stay in L1.
const CONV_CB: usize = 16;
/// Register tiles per parallel task: the task's input window and accumulators stay in L2.
const CONV_TASK_TILES: usize = 8;

simd_dispatch! {
    /// acc[o][p] += Σ_{ci < cb, tap} w[(ci·taps + tap)·CONV_TO + o] · x[ci·cs + offs[tap] + p]
    /// for o < CONV_TO and p < CONV_TN; acc row o starts at o·acc_stride.
    fn conv_tile(
        acc: &mut [f32],
        acc_stride: usize,
        w: &[f32],
        x: &[f32],
        cs: usize,
        cb: usize,
        offs: &[usize],
    ) {
        let mut r = [[[0f32; CONV_VL]; CONV_TV]; CONV_TO];
        for (o, ro) in r.iter_mut().enumerate() {
            let row = &acc[o * acc_stride..o * acc_stride + CONV_TN];
            for (v, rv) in ro.iter_mut().enumerate() {
                rv.copy_from_slice(&row[v * CONV_VL..(v + 1) * CONV_VL]);
            }
        }
        let taps = offs.len();
        let reach = offs.iter().max().map_or(0, |m| m + CONV_TN);
        assert!(
            cb == 0 || ((cb - 1) * cs + reach <= x.len() && cb * taps * CONV_TO <= w.len()),
            "conv_tile: input or weights shorter than the tile reads"
        );
        for ci in 0..cb {
            // SAFETY: ci·cs + off + CONV_TN <= x.len() for every tap (asserted above).
            let xc = unsafe { x.as_ptr().add(ci * cs) };
            let wc = &w[ci * taps * CONV_TO..(ci + 1) * taps * CONV_TO];
            for (&off, wt) in offs.iter().zip(wc.chunks_exact(CONV_TO)) {
                // SAFETY: as above.
                let xs = unsafe { &*(xc.add(off) as *const [f32; CONV_TN]) };
                for (ro, &wo) in r.iter_mut().zip(wt) {
                    for (rv, xv) in ro.iter_mut().zip(xs.chunks_exact(CONV_VL)) {
                        for (a, &xe) in rv.iter_mut().zip(xv) {
                            *a = wo.mul_add(xe, *a);
                        }
                    }
                }
            }
        }
        for (o, ro) in r.iter().enumerate() {
            let row = &mut acc[o * acc_stride..o * acc_stride + CONV_TN];
            for (v, rv) in ro.iter().enumerate() {
                row[v * CONV_VL..(v + 1) * CONV_VL].copy_from_slice(rv);
            }
        }
    }
}

/// Packs the (o, c, kt, kh, kw) weights for one output frame and phase into (groups, c, taps,
/// [`CONV_TO`]) with zero rows past o: tap (a, b, d) of the merged lists gets the sum of the
/// kernel weights it merges.
fn pack_conv_weights(
    wd: &[f32],
    (o, c, kt, kh, kw): (usize, usize, usize, usize, usize),
    t_sets: &[Vec<usize>],
    y_taps: &[(usize, Vec<usize>)],
    x_taps: &[(usize, Vec<usize>)],
) -> Vec<f32> {
    let taps = t_sets.len() * y_taps.len() * x_taps.len();
    let mut wpk = vec![0f32; o.div_ceil(CONV_TO) * c * taps * CONV_TO];
    for oi in 0..o {
        let (g, r) = (oi / CONV_TO, oi % CONV_TO);
        for ci in 0..c {
            let wk = &wd[(oi * c + ci) * kt * kh * kw..][..kt * kh * kw];
            let mut tap = 0;
            for is in t_sets {
                for (_, js) in y_taps {
                    for (_, ks) in x_taps {
                        let mut s = 0f32;
                        for &i in is {
                            for &j in js {
                                for &k in ks {
                                    s += wk[(i * kh + j) * kw + k];
                                }
                            }
                        }
                        wpk[((g * c + ci) * taps + tap) * CONV_TO + r] = s;
                        tap += 1;
                    }
                }
            }
        }
    }
    wpk
}

/// Unit-stride 3D convolution of x replicate-padded by `pad` (frames in front, rows and columns
/// on both sides) and nearest-upsampled first by `up` (t, h, w) factors (the first frame
/// spatially only; (1, 1, 1) for a plain convolution), as a direct convolution that builds
/// neither the upsampled nor the padded input and merges the taps that read the same source
/// sample ([`frame_taps`], [`Axis`]): an upsampling by 2 costs 8 instead of 27 taps per output,
/// and the causal padding's repeated first frame is read once.
///
/// Source frames are replicate-padded spatially into a ring of kt frame slots (c channels of
/// hp·wp values, plus [`CONV_TN`] of slack so the last register tile may read past the frame).
/// Per output frame and spatial phase, positions n run over rows laid out at the padded width
/// wp, so a tap (frame, row offset, column offset) reads the frame's slot at n + row·wp + col.
/// Positions are split into tasks of [`CONV_TASK_TILES`] register tiles, all phases' tasks of a
/// frame run in parallel; a task accumulates all output channels of its positions over channel
/// blocks of [`CONV_CB`] with [`conv_tile`] (weights packed per group of [`CONV_TO`] output
/// channels), then copies the valid columns out to their upsampled positions.
pub(super) fn conv3d_f32_direct(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: (usize, usize, usize),
    up: (usize, usize, usize),
) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let (o, _, kt, kh, kw) = weight.dims5()?;
    let frames = frame_taps(t, kt, pad.0, up.0);
    let (ay, ax) = (Axis::new(h, kh, pad.1, up.1), Axis::new(w, kw, pad.2, up.2));
    let (hp, wp) = (h + ay.lo + ay.hi, w + ax.lo + ax.hi);
    let (to, ho, wo) = (frames.len(), ay.total, ax.total);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let plane = to * ho * wo;
    let mut out = vec![0f32; b * o * plane];
    let groups = o.div_ceil(CONV_TO);
    let cs = hp * wp + CONV_TN;
    let slot = c * cs;
    // an output frame reads at most kt consecutive source frames: source s lives in slot s % kt
    let mut ring = vec![0f32; kt * slot];
    let task_n = CONV_TASK_TILES * CONV_TN;
    // (spatial phase (ry, rx), valid positions at width wp); then (phase, first position) tasks
    let phases: Vec<((usize, usize), usize)> = (0..up.1)
        .flat_map(|ry| (0..up.2).map(move |rx| (ry, rx)))
        .filter(|&(ry, rx)| ay.outs[ry] > 0 && ax.outs[rx] > 0)
        .map(|(ry, rx)| ((ry, rx), (ay.outs[ry] - 1) * wp + ax.outs[rx]))
        .collect();
    let tasks: Vec<(usize, usize)> = phases
        .iter()
        .enumerate()
        .flat_map(|(p, &(_, n_valid))| (0..n_valid).step_by(task_n).map(move |n0| (p, n0)))
        .collect();
    with_f32s([&x, &weight], |[xd, wd]| -> Result<()> {
        let bias_v = &bias_values(bias, o)?;
        // per kernel time taps of each source frame: the packed weights of each spatial phase
        let mut packed: HashMap<Vec<Vec<usize>>, Vec<Vec<f32>>> = HashMap::new();
        for bi in 0..b {
            let xb = &xd[bi * c * t * h * w..(bi + 1) * c * t * h * w];
            // source frame s, padded by (lo, hi) rows and columns, into its ring slot
            let fill = |ring: &mut [f32], s: usize| {
                let dst = &mut ring[(s % kt) * slot..(s % kt + 1) * slot];
                dst.par_chunks_mut(cs).enumerate().for_each(|(ci, frame)| {
                    let src = &xb[(ci * t + s) * h * w..(ci * t + s + 1) * h * w];
                    for (yy, row) in frame[..hp * wp].chunks_exact_mut(wp).enumerate() {
                        let ys = yy.saturating_sub(ay.lo).min(h - 1);
                        im2col_row(&src[ys * w..(ys + 1) * w], row, 0, ax.lo, 1);
                    }
                });
            };
            let mut next = 0;
            let ob = SharedMut(out[bi * o * plane..(bi + 1) * o * plane].as_mut_ptr());
            for (ti, taps_t) in frames.iter().enumerate() {
                for s in frames_to_load(&mut next, taps_t, kt) {
                    fill(&mut ring, s);
                }
                let t_sets: Vec<Vec<usize>> = taps_t.iter().map(|(_, is)| is.clone()).collect();
                let weights = packed.entry(t_sets).or_insert_with_key(|t_sets| {
                    phases
                        .iter()
                        .map(|&((ry, rx), _)| {
                            let (y_taps, x_taps) = (&ay.phases[ry], &ax.phases[rx]);
                            pack_conv_weights(wd, (o, c, kt, kh, kw), t_sets, y_taps, x_taps)
                        })
                        .collect()
                });
                // per phase: packed weights and the tap offsets in the same order
                let plans: Vec<(&[f32], Vec<usize>)> = phases
                    .iter()
                    .zip(weights.iter())
                    .map(|(&((ry, rx), _), wpk)| {
                        let (y_taps, x_taps) = (&ay.phases[ry], &ax.phases[rx]);
                        let offs = taps_t
                            .iter()
                            .flat_map(|(s, _)| {
                                y_taps.iter().flat_map(move |(oy, _)| {
                                    x_taps
                                        .iter()
                                        .map(move |(ox, _)| (s % kt) * slot + oy * wp + ox)
                                })
                            })
                            .collect();
                        (wpk.as_slice(), offs)
                    })
                    .collect();
                let ring = &ring;
                tasks.par_iter().for_each_init(
                    || vec![0f32; groups * CONV_TO * task_n],
                    |acc, &(p, n0)| {
                        let ((ry, rx), n_valid) = phases[p];
                        let (wpk, offs) = (plans[p].0, &plans[p].1);
                        let taps = offs.len();
                        let tiles = (n_valid - n0).div_ceil(CONV_TN).min(CONV_TASK_TILES);
                        for (row, bv) in acc.chunks_exact_mut(task_n).zip(bias_v) {
                            row.fill(*bv);
                        }
                        for cb0 in (0..c).step_by(CONV_CB) {
                            let cb = CONV_CB.min(c - cb0);
                            for tile in 0..tiles {
                                for g in 0..groups {
                                    let wg = &wpk[(g * c + cb0) * taps * CONV_TO..]
                                        [..cb * taps * CONV_TO];
                                    let ag = &mut acc[g * CONV_TO * task_n..][..CONV_TO * task_n];
                                    let n = n0 + tile * CONV_TN;
                                    conv_tile(
                                        &mut ag[tile * CONV_TN..],
                                        task_n,
                                        wg,
                                        &ring[cb0 * cs + n..],
                                        cs,
                                        cb,
                                        offs,
                                    );
                                }
                            }
                        }
                        // valid positions n0..n1 of rows y at width wp -> (y, x < outs)
                        let n1 = (n0 + task_n).min(n_valid);
                        let (fy, fx) = (ay.factor, ax.factor);
                        let wv = ax.outs[rx];
                        for (oi, row) in acc.chunks_exact(task_n).take(o).enumerate() {
                            let mut n = n0;
                            while n < n1 {
                                let (y, xx) = (n / wp, n % wp);
                                let end = (n1 - n).min(wp - xx);
                                let len = end.min(wv.saturating_sub(xx));
                                let src = &row[n - n0..n - n0 + len];
                                let at = oi * plane + (ti * ho + y * fy + ry) * wo + xx * fx + rx;
                                // SAFETY: output row y·fy + ry, columns (xx..xx + len)·fx + rx
                                // of channel oi of frame ti: tasks cover disjoint positions and
                                // phases disjoint rows or columns.
                                unsafe {
                                    if fx == 1 {
                                        std::slice::from_raw_parts_mut(ob.ptr().add(at), len)
                                            .copy_from_slice(src);
                                    } else {
                                        for (i, &v) in src.iter().enumerate() {
                                            *ob.ptr().add(at + i * fx) = v;
                                        }
                                    }
                                }
                                n += end;
                            }
                        }
                    },
                );
            }
        }
        Ok(())
    })??;
    Tensor::from_vec(out, (b, o, to, ho, wo), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_weights_sum_the_merged_taps() {
        // 7 output channels: two groups of CONV_TO, the second padded with zero rows; a 2×2×2
        // kernel with both time taps merged, rows 0 and 1 apart and both columns merged
        let (o, c, kt, kh, kw) = (7, 2, 2, 2, 2);
        let wd: Vec<f32> = (0..o * c * kt * kh * kw).map(|i| i as f32).collect();
        let t_sets = vec![vec![0, 1]];
        let y_taps = vec![(0, vec![0]), (1, vec![1])];
        let x_taps = vec![(0, vec![0, 1])];
        let wpk = pack_conv_weights(&wd, (o, c, kt, kh, kw), &t_sets, &y_taps, &x_taps);
        let taps = 2;
        assert_eq!(wpk.len(), 2 * c * taps * CONV_TO);
        for oi in 0..2 * CONV_TO {
            for ci in 0..c {
                for (tap, j) in [0, 1].into_iter().enumerate() {
                    let want = if oi < o {
                        let w =
                            |i: usize, k: usize| wd[(((oi * c + ci) * kt + i) * kh + j) * kw + k];
                        w(0, 0) + w(0, 1) + w(1, 0) + w(1, 1)
                    } else {
                        0.0
                    };
                    let (g, r) = (oi / CONV_TO, oi % CONV_TO);
                    assert_eq!(wpk[((g * c + ci) * taps + tap) * CONV_TO + r], want);
                }
            }
        }
    }
}
