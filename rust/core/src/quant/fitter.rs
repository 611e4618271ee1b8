//! The block fitter: one block of up to 256 weights, every option the bit allocation prices.
//!
//! Same decisions as the first fitter (kept as `reference.rs` and tested against it), organised
//! so that nothing is computed twice and the hot loops vectorise:
//!
//! * one sort by |x| per block; the one-plane fit with m = 0 predators is the first step of the
//!   predator sequence and is reused as plane 1 of the joint fit;
//! * predators come off a compacted list sorted by |x| (the usual one, the largest, is a pointer
//!   bump), the error scan is branch-free;
//! * the residual `x - s1 t1` is ordered by merging the three runs it is already sorted in
//!   (the support above s1, the support below s1 reversed, the rest) instead of sorting;
//! * the joint refinement assigns the nearest of the 9 levels with compares and adds (no table
//!   look-up) and gathers the next least-squares sums in the same pass;
//! * fixed-size scratch, no allocation per block.

use super::{BlockFit, QuantConfig, NM, PREDATOR_COUNTS, STATS_ITERS};
use half::f16;

/// Largest block the fitter takes.
pub(crate) const MAXB: usize = 256;
/// Most predators of one block.
const MAXP: usize = PREDATOR_COUNTS[NM - 1];

pub(super) fn round_f16(v: f64) -> f32 {
    f16::from_f64(v).to_f32()
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
    for &ki in keys.iter() {
        let ki = ki as i64;
        let rank: i64 = keys.iter().map(|&kj| ((kj as i64) > ki) as i64).sum();
        tmp[rank as usize] = ki as u64;
    }
    keys.copy_from_slice(tmp);
}

/// Merges two descending runs of distinct keys into `out`.
#[inline(always)]
fn merge_desc(a: &[u64], b: &[u64], out: &mut [u64]) {
    let (mut i, mut j) = (0, 0);
    for o in out.iter_mut() {
        if j == b.len() || (i < a.len() && a[i] > b[j]) {
            *o = a[i];
            i += 1;
        } else {
            *o = b[j];
            j += 1;
        }
    }
}

/// Best support of the exact ternary over a list sorted by |x| descending: (size, sum h|x|,
/// sum h) of the prefix with the largest `(sum h|x|)^2 / sum h` (the first on ties; size 0
/// when no prefix has a positive gain). The prefix sums run serially, the gains and their
/// maximum vectorise (gains are >= 0, so their bits order like their values).
#[inline(always)]
fn best_support(h: &[f32], hax: &[f64], pa: &mut [f64], ph: &mut [f64], g: &mut [f64]) -> (usize, f64, f64) {
    let n = h.len();
    let (pa, ph, g) = (&mut pa[..n], &mut ph[..n], &mut g[..n]);
    let (mut a, mut hs) = (0f64, 0f64);
    for (((&hk, &hx), pa), ph) in h.iter().zip(hax).zip(pa.iter_mut()).zip(ph.iter_mut()) {
        a += hx;
        hs += hk as f64;
        *pa = a;
        *ph = hs;
    }
    for ((g, &a), &hs) in g.iter_mut().zip(pa.iter()).zip(ph.iter()) {
        *g = if hs > 0.0 { a * a / hs } else { 0.0 };
    }
    let top = g.iter().fold(0u64, |m, v| m.max(v.to_bits()));
    if top == 0 {
        return (0, 0.0, 0.0);
    }
    let i = g.iter().position(|v| v.to_bits() == top).unwrap_or(0);
    (i + 1, pa[i], ph[i])
}

/// `sum h x^2` in index order.
#[inline(always)]
fn energy(x: &[f32], h: &[f32]) -> f64 {
    x.iter().zip(h).map(|(v, w)| *w as f64 * (*v as f64) * (*v as f64)).sum()
}

/// Weighted least-squares sums of the joint fit, [s11, s12, s22, r1, r2], over whole chunks of
/// 8 (the arrays are zero-padded), in 8 lanes.
#[inline(always)]
fn ls_sums(x: &[f32], hm: &[f32], u: &[f32], v: &[f32]) -> [f64; 5] {
    let mut acc = [[0f64; 8]; 5];
    for (((xc, hc), uc), vc) in x.chunks_exact(8).zip(hm.chunks_exact(8)).zip(u.chunks_exact(8)).zip(v.chunks_exact(8)) {
        for l in 0..8 {
            let (uu, vv, w) = (uc[l] as f64, vc[l] as f64, hc[l] as f64);
            let wx = w * xc[l] as f64;
            acc[0][l] += w * uu * uu;
            acc[1][l] += w * uu * vv;
            acc[2][l] += w * vv * vv;
            acc[3][l] += uu * wx;
            acc[4][l] += vv * wx;
        }
    }
    acc.map(lanes8)
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
    /// The compacted list (sorted by |x|, predators taken out) is `lo..lo + len` of these.
    l_ax: [f32; MAXB],
    l_h: [f32; MAXB],
    l_hax: [f64; MAXB],
    l_idx: [u8; MAXB],
    lo: usize,
    len: usize,
    /// Predator positions in the order they were taken.
    seq: [u8; MAXP],
    nseq: usize,
    /// One-plane fit without predators: (support, scale).
    full: (usize, f32),
    /// One-plane fit after the last predator: (support, scale, error without predators).
    last: (usize, f32, f64),
    /// The block, zero-padded to whole chunks of 8.
    xs: [f32; MAXB],
    e_tmp: [f32; MAXB],
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
            l_ax: [0.0; MAXB],
            l_h: [0.0; MAXB],
            l_hax: [0.0; MAXB],
            l_idx: [0; MAXB],
            lo: 0,
            len: 0,
            seq: [0; MAXP],
            nseq: 0,
            full: (0, 0.0),
            last: (0, 0.0, 0.0),
            xs: [0.0; MAXB],
            e_tmp: [0.0; MAXB],
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
        let n8 = (n + 7) & !7;
        self.xs[..n].copy_from_slice(x);
        self.xs[n..n8].fill(0.0);
        for (i, (k, &v)) in self.keys[..n].iter_mut().zip(x).enumerate() {
            *k = key(v, i);
        }
        sort_desc(&mut self.keys[..n], &mut self.keys2[..n]);
        for p in 0..n {
            let k = key_index(self.keys[p]);
            let ax = x[k].abs();
            self.order[p] = k as u8;
            self.l_idx[p] = k as u8;
            self.l_ax[p] = ax;
            self.l_h[p] = h[k];
            self.l_hax[p] = h[k] as f64 * ax as f64;
        }
        self.lo = 0;
        self.len = n;
        self.nseq = 0;
        let mut total = energy(x, h);
        let mut perr = 0f64;
        let mut e1 = [f64::INFINITY; NM];
        let mut ci = 0;
        for m in 0..=max_m {
            let (lo, len) = (self.lo, self.len);
            let (support, ba, bh) = best_support(&self.l_h[lo..lo + len], &self.l_hax[lo..lo + len], &mut self.pa, &mut self.ph, &mut self.g);
            let s = if support > 0 { round_f16(ba / bh) } else { 0.0 };
            // sum_S h (|x| - s)^2 + sum_notS h x^2, expanded; exact for the rounded s.
            let err = (total - 2.0 * s as f64 * ba + (s as f64) * (s as f64) * bh).max(0.0);
            if m == 0 {
                self.full = (support, s);
            }
            self.last = (support, s, err);
            if ci < NM && PREDATOR_COUNTS[ci] == m {
                e1[ci] = err + perr;
                ci += 1;
            }
            if m == max_m || len == 0 {
                break;
            }
            // Largest weighted error: h (|x| - s)^2 inside the support, h x^2 outside. Errors
            // are >= 0, so their bits order like their values; the first largest wins.
            let (ax, hh, et) = (&self.l_ax[lo..lo + len], &self.l_h[lo..lo + len], &mut self.e_tmp[..len]);
            for (i, e) in et.iter_mut().enumerate() {
                let d = ax[i] - if i < support { s } else { 0.0 };
                *e = hh[i] * d * d;
            }
            let top = et.iter().fold(0u32, |m, e| m.max(e.to_bits()));
            let j = et.iter().position(|e| e.to_bits() == top).unwrap_or(0);
            let g = lo + j;
            let k = self.l_idx[g] as usize;
            let (axj, hj) = (self.l_ax[g], self.l_h[g]);
            total -= hj as f64 * (axj as f64) * (axj as f64);
            let d = x[k] as f64 - f16::from_f32(x[k]).to_f64();
            perr += hj as f64 * d * d;
            self.seq[self.nseq] = k as u8;
            self.nseq += 1;
            // Take it out: shift the (usually empty) part before it up by one.
            self.l_ax.copy_within(lo..g, lo + 1);
            self.l_h.copy_within(lo..g, lo + 1);
            self.l_hax.copy_within(lo..g, lo + 1);
            self.l_idx.copy_within(lo..g, lo + 1);
            self.lo += 1;
            self.len -= 1;
        }
        e1
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
        // Order the residual by |r| descending: in the support |r| = ||x| - s1| falls while
        // |x| >= s1 and rises after; outside it |r| = |x| falls. Merge these three runs, then
        // insertion-sort away the rare inversions FP rounding can leave.
        let split = (0..sup).find(|&p| x[self.order[p] as usize].abs() < s1).unwrap_or(sup);
        for p in 0..n {
            let q = if p < split || p >= sup { p } else { sup - 1 - (p - split) };
            let k = self.order[q] as usize;
            self.keys[p] = key(self.resid[k], k);
        }
        merge_desc(&self.keys[..split], &self.keys[split..sup], &mut self.keys2[..sup]);
        self.keys2[sup..n].copy_from_slice(&self.keys[sup..n]);
        merge_desc(&self.keys2[..sup], &self.keys2[sup..n], &mut self.keys[..n]);
        let keys = &mut self.keys[..n];
        for i in 1..n {
            let mut j = i;
            while j > 0 && keys[j - 1] < keys[j] {
                keys.swap(j - 1, j);
                j -= 1;
            }
        }
        // Exact ternary of the residual (the list arrays are free again: reuse them).
        for (p, &kk) in keys.iter().enumerate() {
            let k = key_index(kk);
            self.l_h[p] = h[k];
            self.l_hax[p] = h[k] as f64 * self.resid[k].abs() as f64;
        }
        let (sup2, best_a, best_h) = best_support(&self.l_h[..n], &self.l_hax[..n], &mut self.pa, &mut self.ph, &mut self.g);
        let keys = &self.keys[..n];
        let s2 = if sup2 > 0 { round_f16(best_a / best_h) } else { 0.0 };
        for &kk in &keys[..sup2] {
            let k = key_index(kk);
            self.v[k] = sign(self.resid[k]);
        }
        self.mk[..n].fill(1.0);
        self.mk[n..n8].fill(0.0);
        self.hm[..n].copy_from_slice(&h[..n]);
        self.hm[n..n8].fill(0.0);
        self.refine(s1, s2, iters)
    }

    /// Alternating refinement of the joint fit from codes `u`/`v` and scales (a, b): weighted
    /// least squares for (a, b), then nearest-of-9-levels assignment. Never increases the error;
    /// returns the best (a, b, err) seen, with its codes in `u`/`v`.
    #[inline(always)]
    fn refine(&mut self, a0: f32, b0: f32, iters: usize) -> (f32, f32, f64) {
        let n8 = (self.n + 7) & !7;
        let (mut ba, mut bb) = (a0, b0);
        let mut best = {
            let mut acc = [0f64; 8];
            for (((xc, hc), uc), vc) in self.xs[..n8].chunks_exact(8).zip(self.hm[..n8].chunks_exact(8))
                .zip(self.u[..n8].chunks_exact(8)).zip(self.v[..n8].chunks_exact(8)) {
                for l in 0..8 {
                    let d = xc[l] as f64 - a0 as f64 * uc[l] as f64 - b0 as f64 * vc[l] as f64;
                    acc[l] += hc[l] as f64 * d * d;
                }
            }
            lanes8(acc)
        };
        let mut sums = ls_sums(&self.xs[..n8], &self.hm[..n8], &self.u[..n8], &self.v[..n8]);
        self.converged = false;
        for _ in 0..iters {
            let [s11, s12, s22, r1, r2] = sums;
            let det = s11 * s22 - s12 * s12;
            if det.abs() <= 1e-9 * (s11 * s22).max(1e-300) {
                self.converged = true;
                break;
            }
            let a = round_f16((r1 * s22 - r2 * s12) / det);
            let b = round_f16((r2 * s11 - r1 * s12) / det);
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
            let (u0, v0) = (lv[0].1 as f32, lv[0].2 as f32);
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
            let e = lanes8(eacc);
            if e < best {
                best = e;
                ba = a;
                bb = b;
                std::mem::swap(&mut self.u, &mut self.nu);
                std::mem::swap(&mut self.v, &mut self.nv);
                sums = ls_sums(&self.xs[..n8], &self.hm[..n8], &self.u[..n8], &self.v[..n8]);
            } else {
                self.converged = true;
                break;
            }
        }
        (ba, bb, best)
    }

    /// Errors of every (predator count, planes) option of one block: `[planes-1][count idx]`.
    /// One-plane errors are exact. Two-plane errors are upper bounds of what `fit` returns:
    /// the m = 0 joint fit with the predators' own errors taken out (`fit` then refines, which
    /// can only lower the error).
    pub fn block_stats(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above), all `block_stats_avx2` requires.
            return unsafe { block_stats_avx2(self, x, h, cfg) };
        }
        self.block_stats_scalar(x, h, cfg)
    }

    /// `block_stats` compiled for the baseline CPU (the reference of the AVX2 build; both
    /// do the same operations in the same order, so they agree bit for bit).
    #[inline(always)]
    pub(crate) fn block_stats_scalar(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        let max_m = if cfg.allow_predators { MAXP.min(x.len()) } else { 0 };
        let e1 = self.predators(x, h, max_m);
        let mut out = [[f32::INFINITY; NM]; 2];
        for ci in 0..NM {
            out[0][ci] = e1[ci] as f32;
        }
        if cfg.allow_plane2 {
            // Fewer refinements than `fit` does: `fit` continues the same sequence, so these
            // stay upper bounds.
            let (a, b, e0) = self.two_planes(x, h, cfg.joint_iters.min(STATS_ITERS));
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
                    let dp = x[k] as f64 - f16::from_f32(x[k]).to_f64();
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
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above), all `fit_avx2` requires.
            return unsafe { fit_avx2(self, x, h, m, planes, cfg) };
        }
        self.fit_scalar(x, h, m, planes, cfg)
    }

    /// `fit_in_place` compiled for the baseline CPU (see `block_stats_scalar`).
    #[inline(always)]
    pub(crate) fn fit_scalar(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
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
            for k in 0..n {
                self.t1[k] = self.u[k] as i8;
                self.t2[k] = self.v[k] as i8;
            }
            r
        } else {
            let (sup, s, e) = self.last;
            self.t1[..n].fill(0);
            self.t2[..n].fill(0);
            for p in self.lo..self.lo + sup {
                let k = self.l_idx[p] as usize;
                self.t1[k] = sign(x[k]) as i8;
            }
            (s, 0.0, e)
        };
        let perr: f64 = self.seq[..self.nseq].iter().map(|&k| {
            let k = k as usize;
            let d = x[k] as f64 - f16::from_f32(x[k]).to_f64();
            h[k] as f64 * d * d
        }).sum();
        (s1, s2, err + perr)
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

/// `Fitter::block_stats_scalar` compiled with AVX2 (8-lane compares, adds and conversions in the
/// refinement and error scans). Callers must check that the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_stats_avx2(f: &mut Fitter, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
    f.block_stats_scalar(x, h, cfg)
}

/// `Fitter::fit_scalar` compiled with AVX2. Callers must check that the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fit_avx2(f: &mut Fitter, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> (f32, f32, f64) {
    f.fit_scalar(x, h, m, planes, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_sort_matches_the_library_sort() {
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
            sort_desc(&mut a, &mut tmp);
            b.sort_unstable_by(|p, q| q.cmp(p));
            assert_eq!(a, b, "n = {n}");
        }
    }
}
