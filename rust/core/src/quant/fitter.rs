//! The block fitter: one block of up to 256 weights, every option the bit allocation prices.
//!
//! Same decisions as the first fitter (kept as `reference.rs` and tested against it), organised
//! so that nothing is computed twice and the hot loops vectorise:
//!
//! * one sort by |x| per block (AVX-512: a bitonic network over 8 registers); the one-plane fit
//!   with m = 0 predators is the first step of the predator sequence and is reused as plane 1
//!   of the joint fit;
//! * the sorted list's prefix sums are computed once; taking a predator subtracts it from the
//!   later prefixes and masks its own (no rescan); the gain and error scans are branch-free
//!   (AVX2: the first maximum tracked per lane in the same pass);
//! * the residual `x - s1 t1` is ordered by the same network (AVX-512), else by merging the
//!   three runs it is already sorted in (the support above s1, the support below s1 reversed,
//!   the rest);
//! * the joint refinement assigns the nearest of the 9 levels by counting the midpoints below
//!   each weight (AVX2: 8 compares and a permute per 8 weights) and gathers the next
//!   least-squares sums in the same pass;
//! * `block_stats` leaves a `BlockRecord` (predator order, one-plane supports, the joint fit
//!   so far) from which `fit_recorded` encodes any option without sorting or refitting;
//! * fixed-size scratch, no allocation per block.

use super::{BlockFit, QuantConfig, NM, PREDATOR_COUNTS, STATS_ITERS};
use half::f16;

/// Largest block the fitter takes.
pub(crate) const MAXB: usize = 256;
/// Most predators of one block.
const MAXP: usize = PREDATOR_COUNTS[NM - 1];

/// `v` rounded to FP16 (through float32, as the FP16 scales have always been rounded on x86:
/// f64 -> f32 -> f16, each to nearest even), back as f32: what `Fitter::round16` gives, for the
/// reference fitter of the tests.
#[cfg(test)]
pub(super) fn round_f16(v: f64) -> f32 {
    f16_to_f32(f32_to_f16(v as f32))
}

/// f32 -> FP16 bits, to nearest even (overflow to infinity, NaN to a quiet NaN): what F16C's
/// `vcvtps2ph` gives, in integer code, the same on every platform (the `half` crate rounds
/// f64 -> f16 directly where the CPU lacks F16C). The AVX2 builds use F16C (`Fitter::to16`).
#[inline(always)]
pub(crate) fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7FFF_FFFF;
    if a >= 0x7F80_0000 {
        return sign | 0x7C00 | if a > 0x7F80_0000 { 0x0200 | ((a >> 13) & 0x3FF) as u16 } else { 0 };
    }
    if a >= 0x3880_0000 {
        // Normal in FP16 (>= 2^-14) or rounding past 65504 into infinity: rebias the exponent
        // (127 -> 15) and round the 13 dropped bits; a carry moves into the exponent.
        let r = a.min(0x4780_0000) - 0x3800_0000;
        return sign | ((r + 0x0FFF + ((r >> 13) & 1)) >> 13) as u16;
    }
    if a <= 0x3300_0000 {
        // At most 2^-25, half the smallest subnormal: zero (the tie goes to even).
        return sign;
    }
    // Subnormal: the significand with its leading bit, shifted right by 14..=24, to nearest even.
    let m = (a & 0x7F_FFFF) | 0x80_0000;
    let shift = 126 - (a >> 23);
    let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
    sign | (q + (rem > half || (rem == half && q & 1 == 1)) as u32) as u16
}

/// FP16 bits -> f32 (exact), inline like `f32_to_f16`.
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let (e, m) = (((h >> 10) & 0x1F) as u32, (h & 0x3FF) as u32);
    match e {
        0 => f32::from_bits((m as f32 * (1.0 / 16_777_216.0)).to_bits() | sign),
        31 => f32::from_bits(sign | 0x7F80_0000 | (m << 13) | if m != 0 { 0x40_0000 } else { 0 }),
        _ => f32::from_bits(sign | ((e + 112) << 23) | (m << 13)),
    }
}

/// f32 -> FP16 bits by F16C (to nearest even). Callers must check F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16c_from_f32(x: f32) -> u16 {
    use std::arch::x86_64::*;
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
}

/// FP16 bits -> f32 by F16C. Callers must check F16C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16c_to_f32(h: u16) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

/// What `Fitter::block_stats` learnt about one block that `Fitter::fit_recorded` needs to
/// encode it with any option without redoing the work (`Analysis` keeps one per block, with
/// the joint fit's codes beside it, `B / 2` bytes: digit `(u + 1) + 3 (v + 1)` per nibble).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct BlockRecord {
    /// Predator positions in the order taken.
    seq: [u8; MAXP],
    nseq: u8,
    /// Per predator count: the position of the last (smallest |x|) weight of the one-plane
    /// support (`u16::MAX` for an empty support), and the plane-1 scale as FP16 bits.
    thr: [u16; NM],
    s: [u16; NM],
    /// Joint two-plane fit without predators (FP16 bits), its error, the refinements it has
    /// had and whether it stopped by itself; `joint_iters == u8::MAX` when not fitted.
    a: u16,
    b: u16,
    e: f64,
    joint_iters: u8,
    converged: bool,
}

#[inline(always)]
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Sort key: |v| as IEEE bits (monotone in |v|) above the inverted index, so sorting keys in
/// descending order sorts by |v| descending with ties to the lower index.
#[inline(always)]
fn key(v: f32, i: usize) -> u64 {
    ((v.abs().to_bits() as u64) << 32) | (u32::MAX - i as u32) as u64
}

#[inline(always)]
fn key_index(k: u64) -> usize {
    (u32::MAX - k as u32) as usize
}

/// Sorts distinct keys (top bit clear) in descending order. Up to 64 keys by rank counting
/// (each key's place is the number of larger keys: branch-free compares that vectorise),
/// beyond that by the library sort. `tmp` is scratch of the same length.
#[inline(always)]
fn sort_desc(keys: &mut [u64], tmp: &mut [u64]) {
    let n = keys.len();
    if n > 64 {
        keys.sort_unstable_by(|a, b| b.cmp(a));
        return;
    }
    // Ranks accumulate over j for all i at once (the inner loop is a vector compare and
    // subtract per 4 or 8 keys, no horizontal sum per key).
    let mut rank = [0i64; 64];
    let rank = &mut rank[..n];
    for &kj in keys.iter() {
        let kj = kj as i64;
        for (r, &ki) in rank.iter_mut().zip(keys.iter()) {
            *r += (kj > ki as i64) as i64;
        }
    }
    for (&r, &k) in rank.iter().zip(keys.iter()) {
        tmp[r as usize] = k;
    }
    keys.copy_from_slice(tmp);
}

/// Merges two descending runs of distinct non-zero keys into `out` (at most 256 keys), without
/// branches on the data: each run is copied to scratch (`pa`, `pb`) ahead of a 0 sentinel, so
/// every step loads both heads, takes the larger and advances its index by the comparison's
/// 0/1 (the residual's runs interleave unpredictably: a mispredicted branch per key cost more).
#[inline(always)]
fn merge_desc(a: &[u64], b: &[u64], out: &mut [u64], pa: &mut [u64; MAXB + 1], pb: &mut [u64; MAXB + 1]) {
    pa[..a.len()].copy_from_slice(a);
    pa[a.len()] = 0;
    pb[..b.len()].copy_from_slice(b);
    pb[b.len()] = 0;
    let (mut i, mut j) = (0usize, 0usize);
    for o in out.iter_mut() {
        let (x, y) = (pa[i.min(MAXB)], pb[j.min(MAXB)]);
        let ta = (x > y) as usize;
        *o = x.max(y);
        i += ta;
        j += 1 - ta;
    }
}

/// The largest key of `v` and the first position holding it (0 for an empty slice): one
/// max pass, then a search by chunks of 8 (compares that vectorise, no early exit per item).
#[inline(always)]
fn first_max<T, K: Copy + Ord + Default>(v: &[T], key: impl Fn(&T) -> K) -> (K, usize) {
    let top = v.iter().fold(K::default(), |m, x| m.max(key(x)));
    let c = v.chunks(8).position(|c| c.iter().fold(false, |f, x| f | (key(x) == top))).unwrap_or(0);
    let i = v[c * 8..].iter().position(|x| key(x) == top).unwrap_or(0);
    (top, c * 8 + i)
}

/// Weighted least-squares sums of the joint fit, [s11, s12, s22, r1, r2], over whole chunks of
/// 8 (the arrays are zero-padded), in 8 lanes.
#[inline(always)]
fn ls_sums(x: &[f32], hm: &[f32], u: &[f32], v: &[f32], fit: Option<(f32, f32)>) -> ([f64; 5], f64) {
    let mut acc = [[0f64; 8]; 5];
    let mut err = [0f64; 8];
    let (a0, b0) = fit.unwrap_or((0.0, 0.0));
    for (((xc, hc), uc), vc) in x.chunks_exact(8).zip(hm.chunks_exact(8)).zip(u.chunks_exact(8)).zip(v.chunks_exact(8)) {
        for l in 0..8 {
            let (uu, vv, w) = (uc[l] as f64, vc[l] as f64, hc[l] as f64);
            let wx = w * xc[l] as f64;
            acc[0][l] += w * uu * uu;
            acc[1][l] += w * uu * vv;
            acc[2][l] += w * vv * vv;
            acc[3][l] += uu * wx;
            acc[4][l] += vv * wx;
            if fit.is_some() {
                let d = xc[l] as f64 - a0 as f64 * uu - b0 as f64 * vv;
                err[l] += w * d * d;
            }
        }
    }
    (acc.map(lanes8), lanes8(err))
}

#[inline(always)]
fn lanes8(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Reusable scratch for fitting blocks of up to 256 weights.
pub struct Fitter {
    n: usize,
    /// Block positions sorted by |x| descending.
    order: [u8; MAXB],
    keys: [u64; MAXB],
    keys2: [u64; MAXB],
    /// Merge scratch (runs with their sentinels).
    ma: [u64; MAXB + 1],
    mb: [u64; MAXB + 1],
    /// The block in that order: |x|, h, h |x|.
    l_ax: [f32; MAXB],
    l_h: [f32; MAXB],
    l_hax: [f64; MAXB],
    /// 1 for the weights of the sorted list not taken as predators, 0 for those taken.
    live: [f32; MAXB],
    /// Error scan keys (error bits + 1, 0 for predators).
    ek: [u32; MAXB],
    /// Predator positions in the order they were taken.
    seq: [u8; MAXP],
    /// Their positions in the sorted list.
    seq_pos: [u8; MAXP],
    nseq: usize,
    /// One-plane fit without predators: (support, scale).
    full: (usize, f32),
    /// One-plane fit after the last predator: (support threshold as in `BlockRecord`, scale,
    /// error without predators).
    last: (u16, f32, f64),
    /// The block, zero-padded to whole chunks of 8.
    xs: [f32; MAXB],
    pa: [f64; MAXB],
    ph: [f64; MAXB],
    g: [f64; MAXB],
    resid: [f32; MAXB],
    /// 1 where the planes fit the weight, 0 at predators; `hm = h * mk`.
    mk: [f32; MAXB],
    hm: [f32; MAXB],
    /// Plane codes (as -1/0/1 floats) of the joint fit and the candidate of a refinement step.
    u: [f32; MAXB],
    v: [f32; MAXB],
    nu: [f32; MAXB],
    nv: [f32; MAXB],
    t1: [i8; MAXB],
    t2: [i8; MAXB],
    /// Whether the last `refine` stopped before its iteration limit (no step improved).
    converged: bool,
    /// Whether every weight of the current block has the same importance (`predators` sets it;
    /// the predator step then finds the largest error without a scan).
    uniform_h: bool,
    /// Tests: always scan (to compare the shortcut of `errors_first_max_uniform` with).
    full_scans: bool,
    /// Per predator count of the last `predators`: (support threshold position, scale), as
    /// in `BlockRecord`.
    one: [(u16, f32); NM],
    /// The joint fit of the last `block_stats`: (a, b, err, refinements; u8::MAX = none).
    joint: (f32, f32, f64, u8),
    /// Set by the entry points: the CPU has AVX2 (AVX-512 F) and the explicit AVX2 (AVX-512)
    /// loops may run (the baseline builds clear them, so tests compare the two).
    avx2: bool,
    avx512: bool,
}

impl Default for Fitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Fitter {
    /// New scratch space.
    pub fn new() -> Fitter {
        Fitter {
            n: 0,
            order: [0; MAXB],
            keys: [0; MAXB],
            keys2: [0; MAXB],
            ma: [0; MAXB + 1],
            mb: [0; MAXB + 1],
            l_ax: [0.0; MAXB],
            l_h: [0.0; MAXB],
            l_hax: [0.0; MAXB],
            live: [0.0; MAXB],
            ek: [0; MAXB],
            seq: [0; MAXP],
            seq_pos: [0; MAXP],
            nseq: 0,
            full: (0, 0.0),
            last: (0, 0.0, 0.0),
            xs: [0.0; MAXB],
            pa: [0.0; MAXB],
            ph: [0.0; MAXB],
            g: [0.0; MAXB],
            resid: [0.0; MAXB],
            mk: [0.0; MAXB],
            hm: [0.0; MAXB],
            u: [0.0; MAXB],
            v: [0.0; MAXB],
            nu: [0.0; MAXB],
            nv: [0.0; MAXB],
            t1: [0; MAXB],
            t2: [0; MAXB],
            converged: false,
            uniform_h: false,
            full_scans: false,
            one: [(u16::MAX, 0.0); NM],
            joint: (0.0, 0.0, 0.0, u8::MAX),
            avx2: false,
            avx512: false,
        }
    }

    /// Sorts the block by |x|, then takes greedy predators up to `max_m`: each the weight with
    /// the largest weighted error under the exact one-plane fit of the weights left. Returns the
    /// one-plane error (predators' FP16 rounding included) after each count of
    /// `PREDATOR_COUNTS` (INFINITY where not reached).
    #[inline(always)]
    fn predators(&mut self, x: &[f32], h: &[f32], max_m: usize) -> [f64; NM] {
        let n = x.len();
        assert!(n <= MAXB && h.len() == n, "block of {n} weights; the fitter takes 1..=256");
        self.n = n;
        // (A fold without early exit, so it vectorises.)
        self.uniform_h = h.iter().fold(true, |all, &v| all & (v == h[0]));
        let n8 = (n + 7) & !7;
        self.xs[..n].copy_from_slice(x);
        self.xs[n..n8].fill(0.0);
        for (i, (k, &v)) in self.keys[..n].iter_mut().zip(x).enumerate() {
            *k = key(v, i);
        }
        if self.has_vector_sort(n) {
            self.vector_sort(n);
        } else {
            sort_desc(&mut self.keys[..n], &mut self.keys2[..n]);
        }
        self.nseq = 0;
        // The block in sorted order, and its prefix sums; a predator taken out at position j is
        // subtracted from every later prefix (no serial rescan), and its own prefix is masked
        // out. (`energy` in the same loop, in index order as it sums: three independent chains,
        // whose add latency the gathers of the same loop fill.)
        let (mut a, mut hs, mut total) = (0f64, 0f64, 0f64);
        for p in 0..n {
            let k = key_index(self.keys[p]);
            let ax = x[k].abs();
            self.order[p] = k as u8;
            self.l_ax[p] = ax;
            self.l_h[p] = h[k];
            let hax = h[k] as f64 * ax as f64;
            self.l_hax[p] = hax;
            a += hax;
            hs += h[k] as f64;
            self.pa[p] = a;
            self.ph[p] = hs;
            self.live[p] = 1.0;
            total += h[p] as f64 * (x[p] as f64) * (x[p] as f64);
        }
        self.live[n..(n + 7) & !7].fill(0.0);
        let mut perr = 0f64;
        let mut e1 = [f64::INFINITY; NM];
        let mut ci = 0;
        let mut hint = None;
        for m in 0..=max_m {
            // Best support: the prefix (of the weights left) with the largest (sum h|x|)^2 / sum h,
            // the first on ties; gains are >= 0, so their bits order like their values. After a
            // predator the last best prefix is a close lower bound of the new best (`hint`).
            let (top, i) = self.gains_first_max(hint);
            hint = (top != 0).then_some(i);
            let pos = if top == 0 { None } else { Some(i) };
            let (support, ba, bh) = match pos {
                Some(i) => (i + 1 - self.seq_pos[..self.nseq].iter().filter(|&&q| q as usize <= i).count(), self.pa[i], self.ph[i]),
                None => (0, 0.0, 0.0),
            };
            let s = if support > 0 { self.round16(ba / bh) } else { 0.0 };
            // sum_S h (|x| - s)^2 + sum_notS h x^2, expanded; exact for the rounded s.
            let err = (total - 2.0 * s as f64 * ba + (s as f64) * (s as f64) * bh).max(0.0);
            if m == 0 {
                self.full = (support, s);
            }
            let thr = pos.map_or(u16::MAX, |i| self.order[i] as u16);
            self.last = (thr, s, err);
            if ci < NM && PREDATOR_COUNTS[ci] == m {
                e1[ci] = err + perr;
                self.one[ci] = (thr, s);
                ci += 1;
            }
            if m == max_m || self.nseq == n {
                break;
            }
            // Largest weighted error among the weights left: h (|x| - s)^2 inside the support
            // (positions up to the best prefix), h x^2 outside; as bits + 1 (0 for the weights
            // taken), the first largest wins.
            let last_in = pos.map_or(0, |i| i + 1);
            let j = self.errors_first_max(last_in, s);
            let k = self.order[j] as usize;
            let (axj, hj) = (self.l_ax[j], self.l_h[j]);
            total -= hj as f64 * (axj as f64) * (axj as f64);
            let d = x[k] as f64 - self.round16(x[k] as f64) as f64;
            perr += hj as f64 * d * d;
            self.seq[self.nseq] = k as u8;
            self.seq_pos[self.nseq] = j as u8;
            self.nseq += 1;
            self.live[j] = 0.0;
            let (vj, wj) = (self.l_hax[j], hj as f64);
            for p in j..n {
                self.pa[p] -= vj;
                self.ph[p] -= wj;
            }
        }
        e1
    }

    /// The best support's gain scan of `predators`: gains `pa^2 / ph` of the weights left (0 for
    /// those taken and where `ph` is 0), and the first largest: (its bits, its position). AVX2
    /// where the entry point found it.
    #[inline(always)]
    fn gains_first_max(&mut self, hint: Option<usize>) -> (u64, usize) {
        let n = self.n;
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            if let Some(h) = hint.filter(|&h| self.live[h] > 0.0 && self.ph[h] > 0.0) {
                // SAFETY: as below; h < n (a position of the same block).
                if let Some(r) = unsafe { gains_first_max_from_avx2(&self.pa, &self.ph, &self.live, n, h) } {
                    return r;
                }
            }
            // SAFETY: `avx2` is set only by `detect_simd`, after checking the CPU has AVX2.
            return unsafe { gains_first_max_avx2(&self.pa, &self.ph, &self.live, n) };
        }
        let _ = hint; // (only the AVX2 scan starts from it)
        for p in 0..n {
            let (a, hs) = (self.pa[p], self.ph[p]);
            self.g[p] = if self.live[p] > 0.0 && hs > 0.0 { a * a / hs } else { 0.0 };
        }
        first_max(&self.g[..n], |v| v.to_bits())
    }

    /// The predator scan of `predators`: weighted errors `h (|x| - s)^2` inside the support (the
    /// first `last_in` positions), `h x^2` outside, of the weights left; the first largest's
    /// position (errors as bits + 1, 0 for the weights taken). AVX2 where the entry point found it.
    #[inline(always)]
    fn errors_first_max(&mut self, last_in: usize, s: f32) -> usize {
        let n = self.n;
        if self.uniform_h && !self.full_scans {
            return self.errors_first_max_uniform(last_in, s);
        }
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only by `detect_simd`, after checking the CPU has AVX2.
            return unsafe { errors_first_max_avx2(&self.l_ax, &self.l_h, &self.live, n, last_in, s) };
        }
        for p in 0..n {
            let d = self.l_ax[p] - if p < last_in { s } else { 0.0 };
            let e = self.l_h[p] * d * d;
            self.ek[p] = if self.live[p] > 0.0 { e.to_bits() + 1 } else { 0 };
        }
        first_max(&self.ek[..n], |e| *e).1
    }

    /// `errors_first_max` where every weight of the block has the same importance c (always so
    /// without importance): the error `(c d) d` grows with |d|, and d = |x| - s inside the support
    /// does not grow along the list (sorted by |x|), so inside the largest error is at the first
    /// or the last weight left, outside (`d = |x|`) at the first. Equal errors there: the first
    /// position wins, and along the list equal errors at the end of the support form one run
    /// (equal d), which is walked back to its first weight left. Same choice as the scan.
    #[inline(always)]
    fn errors_first_max_uniform(&self, last_in: usize, s: f32) -> usize {
        let n = self.n;
        let live = |p: usize| self.live[p] > 0.0;
        let key = |p: usize| {
            let d = self.l_ax[p] - if p < last_in { s } else { 0.0 };
            (self.l_h[p] * d * d).to_bits() + 1
        };
        let mut best = (0u32, 0usize);
        let mut consider = |p: usize, k: u32| {
            if k > best.0 || (k == best.0 && p < best.1) {
                best = (k, p);
            }
        };
        if let Some(p) = (0..last_in).find(|&p| live(p)) {
            consider(p, key(p));
        }
        if let Some(mut p) = (0..last_in).rev().find(|&p| live(p)) {
            let k = key(p);
            for q in (0..p).rev() {
                if !live(q) {
                    continue;
                }
                if key(q) != k {
                    break;
                }
                p = q;
            }
            consider(p, k);
        }
        if let Some(p) = (last_in..n).find(|&p| live(p)) {
            consider(p, key(p));
        }
        best.1
    }

    /// Joint two-plane fit of the whole block (no predators; `predators` must have run on the
    /// same `x`): plane 1 the exact ternary, plane 2 the exact ternary of the residual, then
    /// `iters` refinements. Codes in `u`/`v`; returns (a, b, err).
    #[inline(always)]
    fn two_planes(&mut self, x: &[f32], h: &[f32], iters: usize) -> (f32, f32, f64) {
        let n = self.n;
        let (sup, s1) = self.full;
        let n8 = (n + 7) & !7;
        self.u[..n8].fill(0.0);
        self.v[..n8].fill(0.0);
        for p in 0..sup {
            let k = self.order[p] as usize;
            self.u[k] = sign(x[k]);
        }
        for ((r, &xv), &u) in self.resid[..n].iter_mut().zip(x).zip(&self.u[..n]) {
            *r = xv - s1 * u;
        }
        if self.has_vector_sort(n) {
            // Order the residual by |r| descending: one network sort (cheaper than the merges).
            for (k, key_k) in self.keys[..n].iter_mut().enumerate() {
                *key_k = key(self.resid[k], k);
            }
            self.vector_sort(n);
        } else {
            self.order_residual(x, sup, s1);
        }
        // Exact ternary of the residual (the list arrays are free again: reuse them).
        // Its prefix sums (in the gathering loop), then the gain scan of `predators` with every
        // weight live.
        let (mut a, mut hs) = (0f64, 0f64);
        for (p, &kk) in self.keys[..n].iter().enumerate() {
            let k = key_index(kk);
            self.l_h[p] = h[k];
            let hax = h[k] as f64 * self.resid[k].abs() as f64;
            self.l_hax[p] = hax;
            a += hax;
            hs += h[k] as f64;
            self.pa[p] = a;
            self.ph[p] = hs;
        }
        self.live[..n].fill(1.0);
        self.live[n..n8].fill(0.0);
        let (top, i) = self.gains_first_max(None);
        let (sup2, best_a, best_h) = if top == 0 { (0, 0.0, 0.0) } else { (i + 1, self.pa[i], self.ph[i]) };
        let keys = &self.keys[..n];
        let s2 = if sup2 > 0 { self.round16(best_a / best_h) } else { 0.0 };
        for &kk in &keys[..sup2] {
            let k = key_index(kk);
            self.v[k] = sign(self.resid[k]);
        }
        self.joint_masks(h);
        self.refine(s1, s2, iters)
    }

    /// The residual's keys (`key(r, k)`) in `keys`, sorted descending, by merging the three runs
    /// they are already sorted in.
    #[inline(always)]
    fn order_residual(&mut self, x: &[f32], sup: usize, s1: f32) {
        let n = self.n;
        // Order the residual by |r| descending: in the support |r| = ||x| - s1| falls while
        // |x| >= s1 and rises after; outside it |r| = |x| falls. Merge these three runs, then
        // insertion-sort away the rare inversions FP rounding can leave.
        let split = (0..sup).find(|&p| x[self.order[p] as usize].abs() < s1).unwrap_or(sup);
        for p in 0..n {
            let q = if p < split || p >= sup { p } else { sup - 1 - (p - split) };
            let k = self.order[q] as usize;
            self.keys[p] = key(self.resid[k], k);
        }
        merge_desc(&self.keys[..split], &self.keys[split..sup], &mut self.keys2[..sup], &mut self.ma, &mut self.mb);
        self.keys2[sup..n].copy_from_slice(&self.keys[sup..n]);
        merge_desc(&self.keys2[..sup], &self.keys2[sup..n], &mut self.keys[..n], &mut self.ma, &mut self.mb);
        let keys = &mut self.keys[..n];
        for i in 1..n {
            let mut j = i;
            while j > 0 && keys[j - 1] < keys[j] {
                keys.swap(j - 1, j);
                j -= 1;
            }
        }
    }

    /// Alternating refinement of the joint fit from codes `u`/`v` and scales (a, b): weighted
    /// least squares for (a, b), then nearest-of-9-levels assignment. Never increases the error;
    /// returns the best (a, b, err) seen, with its codes in `u`/`v`.
    #[inline(always)]
    fn refine(&mut self, a0: f32, b0: f32, iters: usize) -> (f32, f32, f64) {
        self.refine_from(a0, b0, None, iters)
    }

    /// `refine`, continuing a previous one that ended at (a0, b0) with error `e0` (given, so
    /// the continuation is the same sequence of steps as one longer refinement).
    #[inline(always)]
    fn refine_from(&mut self, a0: f32, b0: f32, e0: Option<f64>, iters: usize) -> (f32, f32, f64) {
        let n8 = (self.n + 7) & !7;
        let (mut ba, mut bb) = (a0, b0);
        // The least-squares sums, and the error of (a0, b0) unless given, in one pass.
        let (mut sums, err) = ls_sums(&self.xs[..n8], &self.hm[..n8], &self.u[..n8], &self.v[..n8], e0.is_none().then_some((a0, b0)));
        let mut best = e0.unwrap_or(err);
        self.converged = false;
        for _ in 0..iters {
            let [s11, s12, s22, r1, r2] = sums;
            let det = s11 * s22 - s12 * s12;
            if det.abs() <= 1e-9 * (s11 * s22).max(1e-300) {
                self.converged = true;
                break;
            }
            let a = self.round16((r1 * s22 - r2 * s12) / det);
            let b = self.round16((r2 * s11 - r1 * s12) / det);
            // The 9 levels a*u + b*v in ascending order, their midpoints, and the code steps
            // between neighbours: the code of x is the first level's plus the steps of every
            // midpoint below x (the midpoints ascend, so those are a prefix).
            let mut lv: [(f32, i8, i8); 9] = [(0.0, 0, 0); 9];
            let mut i = 0;
            for u in -1i8..=1 {
                for v in -1i8..=1 {
                    lv[i] = (a * u as f32 + b * v as f32, u, v);
                    i += 1;
                }
            }
            lv.sort_by(|p, q| p.0.total_cmp(&q.0));
            let mid: [f32; 8] = std::array::from_fn(|j| 0.5 * (lv[j].0 + lv[j + 1].0));
            let du: [f32; 8] = std::array::from_fn(|j| (lv[j + 1].1 - lv[j].1) as f32);
            let dv: [f32; 8] = std::array::from_fn(|j| (lv[j + 1].2 - lv[j].2) as f32);
            let lu: [f32; 9] = std::array::from_fn(|j| lv[j].1 as f32);
            let lw: [f32; 9] = std::array::from_fn(|j| lv[j].2 as f32);
            // The AVX2 pass also gathers the candidate's least-squares sums (used if it is kept).
            #[cfg(target_arch = "x86_64")]
            let (eacc, next) = if self.avx2 {
                // SAFETY: `avx2` is set only by `detect_simd`, after checking the CPU has AVX2.
                let (e, s) = unsafe { assign_avx2(&self.xs[..n8], &self.hm[..n8], &self.mk[..n8], &mut self.nu[..n8], &mut self.nv[..n8], &mid, &lu, &lw, a, b) };
                (e, Some(s))
            } else {
                (self.assign((lu[0], lw[0]), &mid, &du, &dv, a, b), None)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (eacc, next) = (self.assign((lu[0], lw[0]), &mid, &du, &dv, a, b), None::<[f64; 5]>);
            let e = lanes8(eacc);
            if e < best {
                best = e;
                ba = a;
                bb = b;
                // Only the block's part (swapping the whole arrays would move 4 KiB).
                self.u[..n8].swap_with_slice(&mut self.nu[..n8]);
                self.v[..n8].swap_with_slice(&mut self.nv[..n8]);
                sums = next.unwrap_or_else(|| ls_sums(&self.xs[..n8], &self.hm[..n8], &self.u[..n8], &self.v[..n8], None).0);
            } else {
                self.converged = true;
                break;
            }
        }
        (ba, bb, best)
    }

    /// Assigns each weight the nearest of the 9 levels (codes to `nu`/`nv`, 0 at predators)
    /// and returns the per-lane weighted squared errors: the code is the lowest level's plus
    /// the steps `du`/`dv` of every midpoint `mid` below the weight (the midpoints ascend).
    #[inline(always)]
    fn assign(&mut self, lowest: (f32, f32), mid: &[f32; 8], du: &[f32; 8], dv: &[f32; 8], a: f32, b: f32) -> [f64; 8] {
        let n8 = (self.n + 7) & !7;
        let (u0, v0) = lowest;
        let mut eacc = [0f64; 8];
        for ((((xc, hc), mc), nuc), nvc) in self.xs[..n8].chunks_exact(8).zip(self.hm[..n8].chunks_exact(8))
            .zip(self.mk[..n8].chunks_exact(8)).zip(self.nu[..n8].chunks_exact_mut(8)).zip(self.nv[..n8].chunks_exact_mut(8)) {
            let mut uu = [u0; 8];
            let mut vv = [v0; 8];
            for j in 0..8 {
                let (dub, dvb, mj) = (du[j].to_bits(), dv[j].to_bits(), mid[j]);
                for l in 0..8 {
                    // All ones where x is above the midpoint: adds the step, else +0.
                    let above = ((xc[l] > mj) as u32).wrapping_neg();
                    uu[l] += f32::from_bits(dub & above);
                    vv[l] += f32::from_bits(dvb & above);
                }
            }
            let mut e = [0f32; 8];
            for l in 0..8 {
                uu[l] *= mc[l];
                vv[l] *= mc[l];
                let d = xc[l] - (a * uu[l] + b * vv[l]);
                e[l] = hc[l] * d * d;
            }
            nuc.copy_from_slice(&uu);
            nvc.copy_from_slice(&vv);
            for l in 0..8 {
                eacc[l] += e[l] as f64;
            }
        }
        eacc
    }

    /// `round_f16` (v -> f32 -> FP16 -> f32) by `to16` and `from16`.
    #[inline(always)]
    fn round16(&self, v: f64) -> f32 {
        self.from16(self.to16(v as f32))
    }

    /// f32 -> FP16 bits: by F16C where the entry point found AVX2 (whose builds enable F16C,
    /// so it inlines), else `f32_to_f16`: the same result.
    #[inline(always)]
    fn to16(&self, v: f32) -> u16 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only by `detect_simd`, after checking the CPU has F16C.
            return unsafe { f16c_from_f32(v) };
        }
        f32_to_f16(v)
    }

    /// FP16 bits -> f32, as `to16` chooses.
    #[inline(always)]
    fn from16(&self, h: u16) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: as in `to16`.
            return unsafe { f16c_to_f32(h) };
        }
        f16_to_f32(h)
    }

    /// Sets the SIMD flags from the CPU; whether it has AVX2 and F16C (the entry points then run
    /// their AVX2 builds, which use both).
    #[cfg(target_arch = "x86_64")]
    fn detect_simd(&mut self) -> bool {
        self.avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c");
        self.avx512 = self.avx2 && std::is_x86_feature_detected!("avx512f");
        self.avx2
    }

    /// Whether `vector_sort` can sort `n` keys (AVX-512 F, at most 64 keys).
    #[inline(always)]
    fn has_vector_sort(&self, n: usize) -> bool {
        cfg!(target_arch = "x86_64") && self.avx512 && n <= 64
    }

    /// Sorts `keys[..n]` descending with the AVX-512 bitonic network; only where `has_vector_sort(n)`.
    #[inline(always)]
    fn vector_sort(&mut self, n: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `avx512` is set only by `detect_simd`, after checking the CPU has AVX-512 F.
        unsafe { bitonic_sort_avx512(&mut self.keys[..n]) };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("vector_sort needs x86-64 with AVX-512 ({n} keys)");
    }

    /// `mk` = 1 and `hm` = h on the block's weights, 0 on the padding: the joint fit's masks
    /// before any predator is taken out.
    #[inline(always)]
    fn joint_masks(&mut self, h: &[f32]) {
        let (n, n8) = (self.n, (self.n + 7) & !7);
        self.mk[..n].fill(1.0);
        self.mk[n..n8].fill(0.0);
        self.hm[..n].copy_from_slice(&h[..n]);
        self.hm[n..n8].fill(0.0);
    }

    /// Errors of every (predator count, planes) option of one block: `[planes-1][count idx]`.
    /// One-plane errors are exact. Two-plane errors are upper bounds of what `fit` returns:
    /// the m = 0 joint fit with the predators' own errors taken out (`fit` then refines, which
    /// can only lower the error).
    pub fn block_stats(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        #[cfg(target_arch = "x86_64")]
        if self.detect_simd() {
            // SAFETY: the CPU has AVX2 (checked just above), all `block_stats_avx2` requires.
            return unsafe { block_stats_avx2(self, x, h, cfg) };
        }
        self.block_stats_scalar(x, h, cfg)
    }

    /// `block_stats`, then `record` (in the same build, so the record's FP16 conversions use
    /// F16C where the CPU has it).
    pub(crate) fn block_stats_record(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig, codes: &mut [u8]) -> ([[f32; NM]; 2], BlockRecord) {
        #[cfg(target_arch = "x86_64")]
        if self.detect_simd() {
            // SAFETY: the CPU has AVX2 and F16C (checked just above), all `block_stats_record_avx2` requires.
            return unsafe { block_stats_record_avx2(self, x, h, cfg, codes) };
        }
        (self.avx2, self.avx512) = (false, false);
        let st = self.block_stats_impl(x, h, cfg);
        (st, self.record(codes))
    }

    /// `block_stats` compiled for the baseline CPU (the reference of the AVX2 build; both
    /// do the same operations in the same order, so they agree bit for bit).
    pub(crate) fn block_stats_scalar(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        (self.avx2, self.avx512) = (false, false);
        self.block_stats_impl(x, h, cfg)
    }

    #[inline(always)]
    fn block_stats_impl(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        let max_m = if cfg.allow_predators { MAXP.min(x.len()) } else { 0 };
        let e1 = self.predators(x, h, max_m);
        let mut out = [[f32::INFINITY; NM]; 2];
        for ci in 0..NM {
            out[0][ci] = e1[ci] as f32;
        }
        self.joint.3 = u8::MAX;
        if cfg.allow_plane2 {
            // Fewer refinements than `fit` does: `fit` continues the same sequence, so these
            // stay upper bounds.
            let iters = cfg.joint_iters.min(STATS_ITERS);
            let (a, b, e0) = self.two_planes(x, h, iters);
            self.joint = (a, b, e0, iters as u8);
            let (mut removed, mut perr) = (0f64, 0f64);
            let mut m = 0;
            for (ci, &cnt) in PREDATOR_COUNTS.iter().enumerate() {
                if cnt > self.nseq {
                    break;
                }
                while m < cnt {
                    let k = self.seq[m] as usize;
                    let d = x[k] as f64 - a as f64 * self.u[k] as f64 - b as f64 * self.v[k] as f64;
                    removed += h[k] as f64 * d * d;
                    let dp = x[k] as f64 - self.round16(x[k] as f64) as f64;
                    perr += h[k] as f64 * dp * dp;
                    m += 1;
                }
                out[1][ci] = ((e0 - removed).max(0.0) + perr) as f32;
            }
        }
        out
    }

    /// Fits one block with `m` predators and 1 or 2 planes; codes are left in `t1`/`t2`
    /// (`codes()`), predators in `seq` (`predator_positions()`). Returns (s1, s2, err).
    pub(crate) fn fit_in_place(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
        #[cfg(target_arch = "x86_64")]
        if self.detect_simd() {
            // SAFETY: the CPU has AVX2 (checked just above), all `fit_avx2` requires.
            return unsafe { fit_avx2(self, x, h, m, planes, cfg) };
        }
        self.fit_scalar(x, h, m, planes, cfg)
    }

    /// `fit_in_place` compiled for the baseline CPU (see `block_stats_scalar`).
    pub(crate) fn fit_scalar(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
        (self.avx2, self.avx512) = (false, false);
        self.fit_impl(x, h, m, planes, cfg)
    }

    #[inline(always)]
    fn fit_impl(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
        let n = x.len();
        self.predators(x, h, m.min(n));
        let (s1, s2, err) = if planes == 2 {
            // Same start as `block_stats`, then predators out and refined from there.
            let (a, b, e) = self.two_planes(x, h, cfg.joint_iters);
            for i in 0..self.nseq {
                let k = self.seq[i] as usize;
                self.mk[k] = 0.0;
                self.hm[k] = 0.0;
                self.u[k] = 0.0;
                self.v[k] = 0.0;
            }
            // Without predators a refinement that stopped by itself would only repeat its
            // last (rejected) step.
            let r = if self.nseq == 0 && self.converged { (a, b, e) } else { self.refine(a, b, cfg.joint_iters.max(1)) };
            self.codes_to_ints();
            r
        } else {
            let (thr, s, e) = self.last;
            let seq = self.seq;
            self.one_plane_codes(x, thr, &seq[..self.nseq]);
            (s, 0.0, e)
        };
        let perr: f64 = self.seq[..self.nseq].iter().map(|&k| {
            let k = k as usize;
            let d = x[k] as f64 - self.round16(x[k] as f64) as f64;
            h[k] as f64 * d * d
        }).sum();
        (s1, s2, err + perr)
    }

    /// The record of the last `block_stats` on `x` (see `BlockRecord`); the joint fit's codes
    /// go to `codes` (`x.len().div_ceil(2)` bytes).
    #[inline(always)]
    pub(crate) fn record(&self, codes: &mut [u8]) -> BlockRecord {
        let n = self.n;
        let mut r = BlockRecord { seq: self.seq, nseq: self.nseq as u8, ..Default::default() };
        for ci in 0..NM {
            r.thr[ci] = self.one[ci].0;
            r.s[ci] = self.to16(self.one[ci].1);
        }
        let (a, b, e, it) = self.joint;
        (r.a, r.b, r.e, r.joint_iters, r.converged) = (self.to16(a), self.to16(b), e, it, self.converged);
        if it != u8::MAX {
            // Digits over whole chunks of 8 (vectorises), 0 past the block.
            let n8 = (n + 7) & !7;
            let mut dg = [0u8; MAXB];
            // (c + 1 of a code c in -1, 0, 1 by compares: a float-to-int cast saturates and
            // does not vectorise well.)
            let c1 = |c: f32| (c > 0.0) as u8 + (c >= 0.0) as u8;
            for ((d, &u), &v) in dg[..n8].iter_mut().zip(&self.u[..n8]).zip(&self.v[..n8]) {
                *d = c1(u) + 3 * c1(v);
            }
            dg[n..n8].fill(0);
            for (c, pair) in codes[..n.div_ceil(2)].iter_mut().zip(dg.chunks_exact(2)) {
                *c = pair[0] | (pair[1] << 4);
            }
        }
        r
    }

    /// `fit_in_place` of the block `block_stats` recorded in `rec` (with `codes`), at the cost
    /// of the encoding alone: the same codes and scales, without sorting, taking predators or
    /// fitting the joint planes again. `m` must be a count the record has (<= its predators).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fit_recorded(&mut self, x: &[f32], h: &[f32], rec: &BlockRecord, codes: &[u8], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32) {
        #[cfg(target_arch = "x86_64")]
        if self.detect_simd() {
            // SAFETY: the CPU has AVX2 (checked just above), all `fit_recorded_avx2` requires.
            return unsafe { fit_recorded_avx2(self, x, h, rec, codes, m, planes, cfg) };
        }
        (self.avx2, self.avx512) = (false, false);
        self.fit_recorded_impl(x, h, rec, codes, m, planes, cfg)
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn fit_recorded_impl(&mut self, x: &[f32], h: &[f32], rec: &BlockRecord, codes: &[u8], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32) {
        let n = x.len();
        let ci = PREDATOR_COUNTS.iter().position(|&c| c == m);
        if ci.is_none() || m > rec.nseq as usize || (planes == 2 && rec.joint_iters == u8::MAX) {
            // Nothing recorded for this option: fit it from scratch.
            let (s1, s2, _) = self.fit_impl(x, h, m, planes, cfg);
            return (s1, s2);
        }
        self.n = n;
        self.seq = rec.seq;
        self.nseq = m;
        if planes == 2 {
            let n8 = (n + 7) & !7;
            self.xs[..n].copy_from_slice(x);
            self.xs[n..n8].fill(0.0);
            // Digit d = (u + 1) + 3 (v + 1) per nibble, decoded by table.
            const DU: [f32; 16] = [-1.0, 0.0, 1.0, -1.0, 0.0, 1.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
            const DV: [f32; 16] = [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
            for (i, &c) in codes[..n.div_ceil(2)].iter().enumerate() {
                let (lo, hi) = ((c & 15) as usize, (c >> 4) as usize);
                (self.u[2 * i], self.u[2 * i + 1]) = (DU[lo], DU[hi]);
                (self.v[2 * i], self.v[2 * i + 1]) = (DV[lo], DV[hi]);
            }
            self.u[n..n8].fill(0.0);
            self.v[n..n8].fill(0.0);
            self.joint_masks(h);
            // `two_planes(x, h, cfg.joint_iters)` as the record's shorter one continued.
            let (mut a, mut b, mut e) = (self.from16(rec.a), self.from16(rec.b), rec.e);
            self.converged = rec.converged;
            let more = cfg.joint_iters.saturating_sub(rec.joint_iters as usize);
            if !rec.converged && more > 0 {
                (a, b, e) = self.refine_from(a, b, Some(e), more);
            }
            for i in 0..m {
                let k = self.seq[i] as usize;
                self.mk[k] = 0.0;
                self.hm[k] = 0.0;
                self.u[k] = 0.0;
                self.v[k] = 0.0;
            }
            let (s1, s2, _) = if m == 0 && self.converged { (a, b, e) } else { self.refine(a, b, cfg.joint_iters.max(1)) };
            self.codes_to_ints();
            (s1, s2)
        } else {
            let ci = ci.unwrap_or(0);
            self.one_plane_codes(x, rec.thr[ci], &rec.seq[..m]);
            (self.from16(rec.s[ci]), 0.0)
        }
    }

    /// One-plane codes to `t1` (`t2` cleared): sign(x) on the support, the weights other than
    /// `preds` whose |x| (ties: position) is at least that of the threshold weight `thr`
    /// (`u16::MAX`: empty support).
    #[inline(always)]
    fn one_plane_codes(&mut self, x: &[f32], thr: u16, preds: &[u8]) {
        let n = x.len();
        let thr = thr as usize;
        let kt = if thr < n { key(x[thr], thr) } else { u64::MAX };
        for (k, t) in self.t1[..n].iter_mut().enumerate() {
            *t = if key(x[k], k) >= kt { sign(x[k]) as i8 } else { 0 };
        }
        for &k in preds {
            self.t1[k as usize] = 0;
        }
        self.t2[..n].fill(0);
    }

    /// `t1`/`t2` from the joint fit's codes `u`/`v` (-1/0/1 floats), by compares (vectorises;
    /// a float-to-int cast does not).
    #[inline(always)]
    fn codes_to_ints(&mut self) {
        let n = self.n;
        for (t, &u) in self.t1[..n].iter_mut().zip(&self.u[..n]) {
            *t = (u > 0.0) as i8 - (u < 0.0) as i8;
        }
        for (t, &v) in self.t2[..n].iter_mut().zip(&self.v[..n]) {
            *t = (v > 0.0) as i8 - (v < 0.0) as i8;
        }
    }

    /// Plane codes of the last `fit_in_place`, one per block column.
    pub(crate) fn codes(&self) -> (&[i8], &[i8]) {
        (&self.t1[..self.n], &self.t2[..self.n])
    }

    /// Predator positions (in-block columns) of the last `fit_in_place`, in the order taken.
    pub(crate) fn predator_positions(&self) -> &[u8] {
        &self.seq[..self.nseq]
    }

    /// The fit of one block with `m` predators (a count from `PREDATOR_COUNTS`) and 1 or 2 planes.
    pub fn fit(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> BlockFit {
        let (s1, s2, err) = self.fit_in_place(x, h, m, planes, cfg);
        let mut preds: Vec<(usize, f16)> = self.predator_positions().iter().map(|&k| (k as usize, f16::from_f32(x[k as usize]))).collect();
        preds.sort_by_key(|p| p.0);
        let (t1, t2) = self.codes();
        BlockFit { s1, s2, t1: t1.to_vec(), t2: t2.to_vec(), preds, err }
    }
}

/// `Fitter::block_stats_impl` compiled with AVX2 (8-lane compares, adds and conversions in the
/// refinement and error scans). Callers must check that the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_stats_avx2(f: &mut Fitter, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
    f.block_stats_impl(x, h, cfg)
}

/// `Fitter::block_stats_record` compiled with AVX2 and F16C. Callers must check both.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn block_stats_record_avx2(f: &mut Fitter, x: &[f32], h: &[f32], cfg: &QuantConfig, codes: &mut [u8]) -> ([[f32; NM]; 2], BlockRecord) {
    let st = f.block_stats_impl(x, h, cfg);
    (st, f.record(codes))
}

/// `Fitter::fit_recorded_impl` compiled with AVX2. Callers must check that the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn fit_recorded_avx2(f: &mut Fitter, x: &[f32], h: &[f32], rec: &BlockRecord, codes: &[u8], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32) {
    f.fit_recorded_impl(x, h, rec, codes, m, planes, cfg)
}

/// `Fitter::fit_impl` compiled with AVX2. Callers must check that the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn fit_avx2(f: &mut Fitter, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
    f.fit_impl(x, h, m, planes, cfg)
}

/// `gains_first_max_avx2` where position `h` (live, ph > 0) is known to have a gain close to
/// the largest: its gain g0 bounds the maximum from below, so only the positions whose gain can
/// reach g0 need the division. A position is left out when `a^2 < g0 ph (1 - 1e-15)` (both
/// rounded as computed): then `a^2 / ph` rounds below g0 (the margin exceeds the rounding of the
/// two products and the quotient, each <= 2^-53 relative), so it cannot be the first largest.
/// The gains of the rest are the same operations as the full scan's, so the same choice.
/// `None` where g0 is 0 (every position would be left in).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gains_first_max_from_avx2(pa: &[f64; MAXB], ph: &[f64; MAXB], live: &[f32; MAXB], n: usize, h: usize) -> Option<(u64, usize)> {
    use std::arch::x86_64::*;
    let g0 = pa[h] * pa[h] / ph[h];
    if g0 <= 0.0 {
        return None;
    }
    let zero = _mm256_setzero_pd();
    let lim = _mm256_set1_pd(g0 * (1.0 - 1e-15));
    let (mut top, mut pos) = (0u64, 0usize);
    for c in (0..n).step_by(4) {
        // c + 4 <= MAXB: c < n <= MAXB and MAXB is a multiple of 4.
        let a = _mm256_loadu_pd(pa.as_ptr().add(c));
        let w = _mm256_loadu_pd(ph.as_ptr().add(c));
        let l = _mm256_cvtps_pd(_mm_loadu_ps(live.as_ptr().add(c)));
        let ok = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(w, zero), _mm256_cmp_pd::<_CMP_GT_OQ>(l, zero));
        let near = _mm256_cmp_pd::<_CMP_GE_OQ>(_mm256_mul_pd(a, a), _mm256_mul_pd(lim, w));
        let mut bits = _mm256_movemask_pd(_mm256_and_pd(ok, near));
        while bits != 0 {
            let p = c + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let g = (pa[p] * pa[p] / ph[p]).to_bits();
            if g > top {
                (top, pos) = (g, p);
            }
        }
    }
    Some((top, pos))
}

/// `Fitter::gains_first_max` with AVX2, 4 positions at a time, the maximum and its position
/// tracked per lane (a strictly larger gain replaces, so each lane keeps its first), then the
/// largest of the lanes, the first position on ties: the same gains (same operations) and the
/// same choice. `live` must be 0 from `n` to the next multiple of 8. Callers must check AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gains_first_max_avx2(pa: &[f64; MAXB], ph: &[f64; MAXB], live: &[f32; MAXB], n: usize) -> (u64, usize) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_pd();
    let (mut best, mut bi) = (zero, _mm256_setzero_si256());
    let mut idx = _mm256_set_epi64x(3, 2, 1, 0);
    let four = _mm256_set1_epi64x(4);
    for c in (0..n).step_by(4) {
        // c + 4 <= MAXB: c < n <= MAXB and MAXB is a multiple of 4.
        let a = _mm256_loadu_pd(pa.as_ptr().add(c));
        let w = _mm256_loadu_pd(ph.as_ptr().add(c));
        let l = _mm256_cvtps_pd(_mm_loadu_ps(live.as_ptr().add(c)));
        let ok = _mm256_and_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(w, zero), _mm256_cmp_pd::<_CMP_GT_OQ>(l, zero));
        let g = _mm256_and_pd(_mm256_div_pd(_mm256_mul_pd(a, a), w), ok);
        let gt = _mm256_cmp_pd::<_CMP_GT_OQ>(g, best);
        best = _mm256_blendv_pd(best, g, gt);
        bi = _mm256_castpd_si256(_mm256_blendv_pd(_mm256_castsi256_pd(bi), _mm256_castsi256_pd(idx), gt));
        idx = _mm256_add_epi64(idx, four);
    }
    let (mut bv, mut bp) = ([0f64; 4], [0i64; 4]);
    _mm256_storeu_pd(bv.as_mut_ptr(), best);
    _mm256_storeu_si256(bp.as_mut_ptr() as *mut __m256i, bi);
    let top = bv.iter().fold(0u64, |m, v| m.max(v.to_bits()));
    let pos = (0..4).filter(|&l| bv[l].to_bits() == top).map(|l| bp[l] as usize).min().unwrap_or(0);
    (top, if top == 0 { 0 } else { pos })
}

/// `Fitter::errors_first_max` with AVX2, 8 positions at a time (per-lane first maximum of the
/// keys, then the first position of the largest): the same errors and the same choice. `live`
/// must be 0 from `n` to the next multiple of 8. Callers must check AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn errors_first_max_avx2(ax: &[f32; MAXB], hh: &[f32; MAXB], live: &[f32; MAXB], n: usize, last_in: usize, s: f32) -> usize {
    use std::arch::x86_64::*;
    let (mut best, mut bi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut idx = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    let (eight, one, sv, li) = (_mm256_set1_epi32(8), _mm256_set1_epi32(1), _mm256_set1_ps(s), _mm256_set1_epi32(last_in as i32));
    let zero = _mm256_setzero_ps();
    for c in (0..n).step_by(8) {
        // c + 8 <= MAXB: c < n <= MAXB and MAXB is a multiple of 8.
        let inside = _mm256_castsi256_ps(_mm256_cmpgt_epi32(li, idx));
        let d = _mm256_sub_ps(_mm256_loadu_ps(ax.as_ptr().add(c)), _mm256_and_ps(sv, inside));
        let e = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(hh.as_ptr().add(c)), d), d);
        let alive = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(live.as_ptr().add(c)), zero));
        // Error bits + 1 <= 0x7f800001: compares as signed 32-bit integers.
        let key = _mm256_and_si256(_mm256_add_epi32(_mm256_castps_si256(e), one), alive);
        let gt = _mm256_cmpgt_epi32(key, best);
        best = _mm256_blendv_epi8(best, key, gt);
        bi = _mm256_blendv_epi8(bi, idx, gt);
        idx = _mm256_add_epi32(idx, eight);
    }
    let (mut bv, mut bp) = ([0i32; 8], [0i32; 8]);
    _mm256_storeu_si256(bv.as_mut_ptr() as *mut __m256i, best);
    _mm256_storeu_si256(bp.as_mut_ptr() as *mut __m256i, bi);
    let top = bv.iter().copied().max().unwrap_or(0);
    (0..8).filter(|&l| bv[l] == top).map(|l| bp[l] as usize).min().unwrap_or(0)
}

/// The compare-exchange stages of a bitonic sorting network over 64 keys: (run length k,
/// distance j), k = 2, 4, .., 64 and j = k / 2, .., 1.
#[cfg(target_arch = "x86_64")]
const BITONIC: [(usize, usize); 21] = {
    let mut s = [(0, 0); 21];
    let (mut k, mut n) = (2, 0);
    while k <= 64 {
        let mut j = k / 2;
        while j > 0 {
            s[n] = (k, j);
            n += 1;
            j /= 2;
        }
        k *= 2;
    }
    s
};

/// For the stages with j < 8 (partner in the same 8-key register): per stage and register r,
/// the lanes that keep the larger key of their pair. Key `i = 8 r + l` lies in a run sorted
/// descending when `i & k == 0` (so the last stage, k = 64, sorts everything descending), where
/// the lower index of a pair keeps the larger key; in an ascending run it keeps the smaller.
#[cfg(target_arch = "x86_64")]
const BITONIC_MASKS: [[u8; 8]; 21] = {
    let mut m = [[0u8; 8]; 21];
    let mut st = 0;
    while st < 21 {
        let (k, j) = BITONIC[st];
        let mut r = 0;
        while r < 8 {
            let mut l = 0;
            while l < 8 {
                let i = 8 * r + l;
                let desc = i & k == 0;
                let lower = i & j == 0;
                if desc == lower {
                    m[st][r] |= 1 << l;
                }
                l += 1;
            }
            r += 1;
        }
        st += 1;
    }
    m
};

/// `sort_desc` for up to 64 keys with AVX-512: a bitonic network over 8 registers of 8 keys
/// (padded with 0, below every key): 6 stages between registers (min/max), 15 inside them (an
/// immediate shuffle to the partner lane, a min and a masked max), ~410 vector operations
/// against the ~1100 of counting each key's rank (the method before it: 320 -> 230 ns per 64
/// keys on Zen 4, the same order, with a permute, min, max and blend per register inside).
/// Callers must check AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn bitonic_sort_avx512(keys: &mut [u64]) {
    use std::arch::x86_64::*;
    let n = keys.len();
    assert!(n <= 64);
    let mut buf = [0u64; 64];
    buf[..n].copy_from_slice(keys);
    // SAFETY: buf holds 64 keys: 8 loads of 8.
    let mut v: [__m512i; 8] = std::array::from_fn(|r| unsafe { _mm512_loadu_si512(buf.as_ptr().add(8 * r) as *const _) });
    for (st, &(k, j)) in BITONIC.iter().enumerate() {
        if j >= 8 {
            let d = j / 8;
            for r in 0..8 {
                if r & d == 0 {
                    let (lo, hi) = (_mm512_min_epu64(v[r], v[r | d]), _mm512_max_epu64(v[r], v[r | d]));
                    // Whole registers: key 8 r lies in a descending run when 8 r & k == 0.
                    (v[r], v[r | d]) = if (8 * r) & k == 0 { (hi, lo) } else { (lo, hi) };
                }
            }
        } else {
            for r in 0..8 {
                // The partner lane L ^ j by an immediate shuffle (j = 1: qwords in 128-bit
                // lanes; 2: 128-bit halves of 256; 4: 256-bit halves), then the smaller key,
                // and the larger where the mask says so (one masked max instead of max + blend).
                let p = match j {
                    1 => _mm512_shuffle_epi32::<0x4E>(v[r]),
                    2 => _mm512_permutex_epi64::<0x4E>(v[r]),
                    _ => _mm512_shuffle_i64x2::<0x4E>(v[r], v[r]),
                };
                v[r] = _mm512_mask_max_epu64(_mm512_min_epu64(v[r], p), BITONIC_MASKS[st][r], v[r], p);
            }
        }
    }
    for (r, vr) in v.iter().enumerate() {
        // SAFETY: 8 keys per register into buf's 64.
        unsafe { _mm512_storeu_si512(buf.as_mut_ptr().add(8 * r) as *mut _, *vr) };
    }
    keys.copy_from_slice(&buf[..n]);
}

/// `Fitter::assign` with AVX2, 8 weights at a time: the count of midpoints below each weight
/// (8 compares) picks its codes from the sorted levels' codes `lu`/`lw` with one permute each
/// (a count of 8, the top level, by a blend): the codes `assign`'s step sums reach, exactly.
/// Then the same products, in the same order, for the errors, and `ls_sums` of the new codes
/// (the same terms per lane in the same order, so the same sums). Callers must check AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn assign_avx2(xs: &[f32], hm: &[f32], mk: &[f32], nu: &mut [f32], nv: &mut [f32], mid: &[f32; 8], lu: &[f32; 9], lw: &[f32; 9], a: f32, b: f32) -> ([f64; 8], [f64; 5]) {
    use std::arch::x86_64::*;
    let n8 = xs.len();
    assert!(n8 & 7 == 0 && hm.len() == n8 && mk.len() == n8 && nu.len() == n8 && nv.len() == n8);
    let (tu, tw) = (_mm256_loadu_ps(lu.as_ptr()), _mm256_loadu_ps(lw.as_ptr()));
    let (tu8, tw8) = (_mm256_set1_ps(lu[8]), _mm256_set1_ps(lw[8]));
    let eight = _mm256_set1_epi32(8);
    let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    // Sums [s11, s12, s22, r1, r2], lanes 0..3 and 4..7.
    let mut acc = [[_mm256_setzero_pd(); 2]; 5];
    for c in (0..n8).step_by(8) {
        let x = _mm256_loadu_ps(xs.as_ptr().add(c));
        let mut cnt = _mm256_setzero_si256();
        for &m in mid {
            cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_set1_ps(m))));
        }
        let top = _mm256_castsi256_ps(_mm256_cmpeq_epi32(cnt, eight));
        let mkc = _mm256_loadu_ps(mk.as_ptr().add(c));
        let uu = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tu, cnt), tu8, top), mkc);
        let vv = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(tw, cnt), tw8, top), mkc);
        _mm256_storeu_ps(nu.as_mut_ptr().add(c), uu);
        _mm256_storeu_ps(nv.as_mut_ptr().add(c), vv);
        let hv = _mm256_loadu_ps(hm.as_ptr().add(c));
        let d = _mm256_sub_ps(x, _mm256_add_ps(_mm256_mul_ps(va, uu), _mm256_mul_ps(vb, vv)));
        let e = _mm256_mul_ps(_mm256_mul_ps(hv, d), d);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e)));
        for (half, ac) in [(0, 0usize), (1, 1)] {
            let pick = |v: __m256| if half == 0 { _mm256_cvtps_pd(_mm256_castps256_ps128(v)) } else { _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)) };
            let (u, v, w) = (pick(uu), pick(vv), pick(hv));
            let wx = _mm256_mul_pd(w, pick(x));
            let wu = _mm256_mul_pd(w, u);
            acc[0][ac] = _mm256_add_pd(acc[0][ac], _mm256_mul_pd(wu, u));
            acc[1][ac] = _mm256_add_pd(acc[1][ac], _mm256_mul_pd(wu, v));
            acc[2][ac] = _mm256_add_pd(acc[2][ac], _mm256_mul_pd(_mm256_mul_pd(w, v), v));
            acc[3][ac] = _mm256_add_pd(acc[3][ac], _mm256_mul_pd(u, wx));
            acc[4][ac] = _mm256_add_pd(acc[4][ac], _mm256_mul_pd(v, wx));
        }
    }
    let lanes = |p: [__m256d; 2]| {
        let mut o = [0f64; 8];
        _mm256_storeu_pd(o.as_mut_ptr(), p[0]);
        _mm256_storeu_pd(o.as_mut_ptr().add(4), p[1]);
        o
    };
    (lanes([lo, hi]), acc.map(|p| lanes8(lanes(p))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_importance_shortcut_matches_the_scan() {
        let mut st = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        let cfg = QuantConfig::new(3.0, 64);
        let (mut f, mut g) = (Fitter::new(), Fitter::new());
        g.full_scans = true;
        for trial in 0..3000 {
            let n = [64, 1, 2, 5, 9, 31, 32, 33, 100, 256][trial % 10];
            // Few distinct magnitudes (runs of equal |x| and equal errors), or heavy tails.
            let x: Vec<f32> = (0..n).map(|_| {
                let r = next();
                let v = if trial % 3 == 0 { ((r % 7) as f32 - 3.0) * 0.5 } else { ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5).powi(3) as f32 * 40.0 };
                if r & 1 == 0 { v } else { -v }
            }).collect();
            let c = [1.0f32, 0.0, 3.7, 1e-6][trial % 4];
            let h = vec![c; n];
            assert_eq!(f.block_stats(&x, &h, &cfg), g.block_stats(&x, &h, &cfg), "trial {trial}");
            let mut ca = vec![0u8; n.div_ceil(2)];
            let mut cb = vec![0u8; n.div_ceil(2)];
            assert_eq!(f.record(&mut ca), g.record(&mut cb), "trial {trial}");
            assert_eq!(ca, cb, "trial {trial}");
        }
    }

    #[test]
    fn f16_conversions_match_the_half_crate() {
        // Every FP16 value to f32 (NaNs: any NaN).
        for h in 0..=u16::MAX {
            let (a, b) = (f16_to_f32(h), f16::from_bits(h).to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{h:#06x}: {a} vs {b}");
        }
        // f32 to FP16: every exponent and sign with the high 9 significand bits, and low 14 bits
        // around each rounding boundary (the 13 dropped bits of normals, up to 24 for subnormals).
        let lows = [0u32, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2FFF, 0x3000, 0x3001, 0x3FFF];
        for hi in 0..(1u32 << 18) {
            for &lo in &lows {
                let x = f32::from_bits((hi << 14) | lo);
                let (a, b) = (f32_to_f16(x), f16::from_f32(x).to_bits());
                assert!(a == b || (x.is_nan() && f16::from_bits(a).is_nan()), "{:#010x}: {a:#06x} vs {b:#06x}", x.to_bits());
            }
        }
        // Subnormal results: every shift, around every rounding point of the kept bits.
        for e in 100u32..=113 {
            for m in (0..(1u32 << 23)).step_by(997).chain([0, 1, 0x3F_FFFF, 0x40_0000, 0x40_0001, 0x7F_FFFF]) {
                for sign in [0, 0x8000_0000] {
                    let x = f32::from_bits(sign | (e << 23) | m);
                    assert_eq!(f32_to_f16(x), f16::from_f32(x).to_bits(), "{:#010x}", x.to_bits());
                }
            }
        }
        // round_f16 keeps the f64 -> f32 -> f16 path.
        for v in [1.0f64 + 2f64.powi(-11) + 2f64.powi(-40), 65519.999, 65520.0, 1e-8, -3.3e-5, 0.1] {
            assert_eq!(round_f16(v), f16::from_f32(v as f32).to_f32(), "{v}");
        }
    }

    #[test]
    fn vector_sorts_match_the_library_sort() {
        let mut st = 0x9E3779B97F4A7C15u64;
        for n in 0..=80 {
            // Few distinct magnitudes, so many ties broken by index.
            let x: Vec<f32> = (0..n).map(|_| {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                ((st % 7) as f32 - 3.0) * if st & 8 == 0 { 1.0 } else { 1e-30 }
            }).collect();
            let mut a: Vec<u64> = x.iter().enumerate().map(|(i, v)| key(*v, i)).collect();
            let mut b = a.clone();
            let mut tmp = vec![0u64; n];
            #[cfg(target_arch = "x86_64")]
            if n <= 64 && std::is_x86_feature_detected!("avx512f") {
                let mut d = a.clone();
                d.sort_unstable_by(|p, q| q.cmp(p));
                let mut e = a.clone();
                // SAFETY: AVX-512 F checked just above.
                unsafe { bitonic_sort_avx512(&mut e) };
                assert_eq!(e, d, "AVX-512 bitonic, n = {n}");
            }
            sort_desc(&mut a, &mut tmp);
            b.sort_unstable_by(|p, q| q.cmp(p));
            assert_eq!(a, b, "n = {n}");
        }
    }
}
