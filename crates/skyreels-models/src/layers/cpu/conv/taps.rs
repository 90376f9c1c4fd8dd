//! Which source samples each output of a unit-stride convolution reads, with the taps that
//! read the same sample merged (their weights summed once): the causal padding's copies of the
//! first frame and the repeated samples of a nearest upsampling.

/// Merged taps: (source index, the kernel taps that read it, whose weights are summed).
pub(super) type Taps = Vec<(usize, Vec<usize>)>;

/// Taps of one axis of [`super::direct::conv3d_f32_direct`] for each output phase: output
/// o·factor + phase reads, for every (offset, kernel indices) of its phase, the source row (or
/// column) o + offset of the source replicate-padded by `lo` in front and `hi` behind, with those
/// kernel weights summed.
///
/// This is the convolution (k taps, replicate padding `pad` on both sides) of the source
/// nearest-upsampled by `factor`: tap j of output Y reads upsampled sample clamp(Y + j − pad),
/// which is source sample clamp(floor((Y + j − pad) / factor)) (clamping commutes with the
/// division), so for Y = o·factor + r it is source o + floor((r + j − pad) / factor): taps that
/// land on the same source sample merge into one.
#[derive(Debug)]
pub(super) struct Axis {
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) factor: usize,
    /// output length
    pub(super) total: usize,
    /// outputs per phase
    pub(super) outs: Vec<usize>,
    pub(super) phases: Vec<Taps>,
}

impl Axis {
    /// Source length `len` (≥ 1), upsampled by `factor` (≥ 1), padded by `pad`, `k` taps; the
    /// caller checks that factor·len + 2·pad ≥ k.
    pub(super) fn new(len: usize, k: usize, pad: usize, factor: usize) -> Self {
        let total = factor * len + 2 * pad + 1 - k;
        let d = |r: usize, j: usize| {
            (r as isize + j as isize - pad as isize).div_euclid(factor as isize)
        };
        let lo = (0..factor).map(|r| -d(r, 0)).max().unwrap_or(0).max(0) as usize;
        let outs: Vec<usize> = (0..factor)
            .map(|r| (total + factor - 1 - r) / factor)
            .collect();
        let phases: Vec<Taps> = (0..factor)
            .map(|r| merge_taps((0..k).map(|j| (d(r, j) + lo as isize) as usize)))
            .collect();
        // output o of a phase reads padded index o + offset <= len + lo + hi − 1
        let hi = outs
            .iter()
            .zip(&phases)
            .filter(|(&n, _)| n > 0)
            .map(|(&n, taps)| n + taps.last().map_or(0, |t| t.0))
            .max()
            .unwrap_or(0)
            .saturating_sub(len + lo);
        Self {
            lo,
            hi,
            factor,
            total,
            outs,
            phases,
        }
    }
}

/// Groups consecutive taps that read the same source index: (index, tap numbers).
fn merge_taps(sources: impl Iterator<Item = usize>) -> Taps {
    let mut taps = Taps::new();
    for (j, s) in sources.enumerate() {
        match taps.last_mut() {
            Some((last, js)) if *last == s => js.push(j),
            _ => taps.push((s, vec![j])),
        }
    }
    taps
}

/// The source frames to load into a ring of `slots` frame slots (frame s in slot s % slots)
/// before computing an output frame with time taps `taps` ([`frame_taps`]: increasing sources,
/// at most `slots` of them), when the frames before `*next` are loaded; advances `*next`.
pub(super) fn frames_to_load(
    next: &mut usize,
    taps: &Taps,
    slots: usize,
) -> std::ops::RangeInclusive<usize> {
    let last = taps.last().map_or(0, |s| s.0);
    let first = (*next).max((last + 1).saturating_sub(slots));
    *next = (*next).max(last + 1);
    first..=last
}

/// Source frames of each output frame of a unit-stride convolution (the direct one, and Winograd
/// with `factor` 1): the t source frames are nearest-upsampled in time by `factor` with the first
/// frame kept single (HunyuanVideo's causal upsampling: 1 + factor·(t − 1) frames), padded in
/// front by `pad` copies of the first, and convolved with `kt` taps. Tap i of output frame f reads upsampled frame u = max(f + i − pad, 0),
/// source frame 0 for u = 0 and (u − 1) / factor + 1 after; taps reading the same frame merge
/// (the causal padding makes the first frames read frame 0 up to kt times).
pub(super) fn frame_taps(t: usize, kt: usize, pad: usize, factor: usize) -> Vec<Taps> {
    let frames = 1 + factor * (t - 1) + pad + 1 - kt;
    (0..frames)
        .map(|f| {
            merge_taps((0..kt).map(|i| match (f + i).saturating_sub(pad) {
                0 => 0,
                u => ((u - 1) / factor + 1).min(t - 1),
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Taps that read the same source sample merge: the causal padding's copies of the first
    /// frame, and the repeated samples of a nearest upsampling (the values are checked against
    /// the naive convolution in `conv3d`'s tests; this pins how much work is saved).
    #[test]
    fn merged_taps_read_each_source_once() {
        let taps = |v: &[(usize, &[usize])]| -> Taps {
            v.iter().map(|(s, is)| (*s, is.to_vec())).collect()
        };
        // causal 3-tap convolution of 4 frames
        let want: Vec<Taps> = vec![
            taps(&[(0, &[0, 1, 2])]),
            taps(&[(0, &[0, 1]), (1, &[2])]),
            taps(&[(0, &[0]), (1, &[1]), (2, &[2])]),
            taps(&[(1, &[0]), (2, &[1]), (3, &[2])]),
        ];
        assert_eq!(frame_taps(4, 3, 2, 1), want);
        // 3 frames upsampled by 2 in time (f0 f1 f1 f2 f2), then the causal convolution
        let want: Vec<Taps> = vec![
            taps(&[(0, &[0, 1, 2])]),
            taps(&[(0, &[0, 1]), (1, &[2])]),
            taps(&[(0, &[0]), (1, &[1, 2])]),
            taps(&[(1, &[0, 1]), (2, &[2])]),
            taps(&[(1, &[0]), (2, &[1, 2])]),
        ];
        assert_eq!(frame_taps(3, 3, 2, 2), want);
        // a row of 5 upsampled by 2, padded by 1, 3 taps: 2 taps per output in each phase
        let a = Axis::new(5, 3, 1, 2);
        assert_eq!((a.lo, a.hi, a.total, &a.outs[..]), (1, 1, 10, &[5, 5][..]));
        let want = vec![
            taps(&[(0, &[0]), (1, &[1, 2])]),
            taps(&[(1, &[0, 1]), (2, &[2])]),
        ];
        assert_eq!(a.phases, want);
        let p = Axis::new(5, 3, 1, 1);
        assert_eq!((p.lo, p.hi, p.total), (1, 1, 5));
        assert_eq!(p.phases, vec![taps(&[(0, &[0]), (1, &[1]), (2, &[2])])]);
    }
}
