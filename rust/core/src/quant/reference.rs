//! The first quantizer's block fitter, kept verbatim as the slow, obviously-correct reference
//! that the fast fitter in `quant.rs` is tested against (same decisions, errors within
//! floating-point summation order).

use super::{BlockFit, QuantConfig, NM, PREDATOR_COUNTS, STATS_ITERS};
use half::f16;


/// Reusable scratch for fitting blocks of up to 256 weights.
pub(crate) struct Fitter {
    order: Vec<usize>,
    excluded: Vec<bool>,
    resid: Vec<f32>,
    t1: Vec<i8>,
    t2: Vec<i8>,
    bt1: Vec<i8>,
    bt2: Vec<i8>,
}

impl Default for Fitter {
    fn default() -> Self {
        Self::new()
    }
}

fn round_f16(v: f64) -> f32 {
    f16::from_f64(v).to_f32()
}

impl Fitter {
    /// New scratch space.
    pub(crate) fn new() -> Fitter {
        Fitter { order: vec![], excluded: vec![], resid: vec![], t1: vec![], t2: vec![], bt1: vec![], bt2: vec![] }
    }

    /// Exact optimal ternary fit of `x` (weights `h`) over the non-excluded entries, with
    /// `order` = indices sorted by |x| descending. Returns (support size, scale rounded to FP16,
    /// weighted error over the non-excluded entries with that scale). `total` must be
    /// `sum h x^2` over the non-excluded entries.
    #[inline]
    fn ternary_scan(x: &[f32], h: &[f32], excluded: &[bool], order: &[usize], total: f64) -> (usize, f32, f64) {
        let (mut a, mut hs) = (0f64, 0f64);
        let (mut best_gain, mut best_k, mut best_a, mut best_h) = (0f64, 0usize, 0f64, 0f64);
        let mut n = 0;
        for &k in order {
            if excluded[k] {
                continue;
            }
            n += 1;
            a += h[k] as f64 * x[k].abs() as f64;
            hs += h[k] as f64;
            if hs > 0.0 && a * a > best_gain * hs {
                best_gain = a * a / hs;
                best_k = n;
                best_a = a;
                best_h = hs;
            }
        }
        if best_k == 0 {
            return (0, 0.0, total);
        }
        let s = round_f16(best_a / best_h);
        // sum_S h (|x| - s)^2 + sum_notS h x^2, expanded; exact for the rounded s.
        let err = (total - 2.0 * s as f64 * best_a + (s as f64) * (s as f64) * best_h).max(0.0);
        (best_k, s, err)
    }

    /// Writes the codes of a `ternary_scan` result into `t` (0 outside the support).
    fn ternary_codes(x: &[f32], excluded: &[bool], order: &[usize], support: usize, t: &mut [i8]) {
        t.iter_mut().for_each(|c| *c = 0);
        let mut n = 0;
        for &k in order {
            if n == support {
                break;
            }
            if excluded[k] {
                continue;
            }
            t[k] = if x[k] > 0.0 { 1 } else if x[k] < 0.0 { -1 } else { 0 };
            n += 1;
        }
    }

    fn total(x: &[f32], h: &[f32], excluded: &[bool]) -> f64 {
        x.iter().zip(h).zip(excluded).filter(|(_, e)| !**e).map(|((v, w), _)| *w as f64 * (*v as f64) * (*v as f64)).sum()
    }

    /// Exact optimal ternary fit: codes into `t`, returns (scale, error).
    pub(crate) fn ternary(x: &[f32], h: &[f32], excluded: &[bool], order: &[usize], t: &mut [i8]) -> (f32, f64) {
        let (k, s, e) = Self::ternary_scan(x, h, excluded, order, Self::total(x, h, excluded));
        Self::ternary_codes(x, excluded, order, k, t);
        (s, e)
    }

    pub(crate) fn sort_order(order: &mut Vec<usize>, v: &[f32]) {
        // |v| as IEEE bits is monotone in |v|; pack (bits, index) into one u64 key so the sort
        // compares plain integers. Ties go to the lower index.
        let mut keys: Vec<u64> = v.iter().enumerate()
            .map(|(i, x)| ((x.abs().to_bits() as u64) << 32) | (u32::MAX - i as u32) as u64)
            .collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        order.clear();
        order.extend(keys.iter().map(|k| (u32::MAX - (*k as u32)) as usize));
    }

    /// Two planes over the non-excluded entries, starting from the residual fit; returns
    /// (a, b, err) with codes in t1/t2.
    fn two_planes(&mut self, x: &[f32], h: &[f32], iters: usize) -> (f32, f32, f64) {
        let n = x.len();
        let (s1, _) = Self::ternary(x, h, &self.excluded, &self.order, &mut self.t1);
        self.resid.clear();
        self.resid.extend((0..n).map(|k| if self.excluded[k] { 0.0 } else { x[k] - s1 * self.t1[k] as f32 }));
        let mut order2 = Vec::with_capacity(n);
        Self::sort_order(&mut order2, &self.resid);
        let (s2, _) = Self::ternary(&self.resid, h, &self.excluded, &order2, &mut self.t2);
        self.refine(x, h, s1, s2, iters)
    }

    fn err_of(&self, x: &[f32], h: &[f32], a: f32, b: f32) -> f64 {
        let mut e = 0f64;
        for k in 0..x.len() {
            if !self.excluded[k] {
                let d = x[k] as f64 - a as f64 * self.t1[k] as f64 - b as f64 * self.t2[k] as f64;
                e += h[k] as f64 * d * d;
            }
        }
        e
    }

    /// Alternating refinement of the joint fit from codes t1/t2 and scales (a, b): weighted
    /// least squares for (a, b), then nearest-of-9-levels assignment. Never increases the error;
    /// returns the best (a, b, err) seen, with its codes in t1/t2.
    fn refine(&mut self, x: &[f32], h: &[f32], a0: f32, b0: f32, iters: usize) -> (f32, f32, f64) {
        let n = x.len();
        let (mut ba, mut bb) = (a0, b0);
        let mut best = self.err_of(x, h, ba, bb);
        for _ in 0..iters {
            // Weighted least squares for (a, b) given the codes.
            let (mut s11, mut s12, mut s22, mut r1, mut r2) = (0f64, 0f64, 0f64, 0f64, 0f64);
            for k in 0..n {
                if self.excluded[k] {
                    continue;
                }
                let (u, v, w) = (self.t1[k] as f64, self.t2[k] as f64, h[k] as f64);
                let wx = w * x[k] as f64;
                s11 += w * u * u;
                s12 += w * u * v;
                s22 += w * v * v;
                r1 += u * wx;
                r2 += v * wx;
            }
            let det = s11 * s22 - s12 * s12;
            if det.abs() <= 1e-9 * (s11 * s22).max(1e-300) {
                break;
            }
            let a = round_f16((r1 * s22 - r2 * s12) / det);
            let b = round_f16((r2 * s11 - r1 * s12) / det);
            // Nearest of the 9 levels a*u + b*v: sort the levels once, then count midpoints.
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
            let mut e = 0f64;
            self.bt1.resize(n, 0);
            self.bt2.resize(n, 0);
            for k in 0..n {
                if self.excluded[k] {
                    self.bt1[k] = 0;
                    self.bt2[k] = 0;
                    continue;
                }
                let idx = mid.iter().map(|&m| (x[k] > m) as usize).sum::<usize>();
                self.bt1[k] = lv[idx].1;
                self.bt2[k] = lv[idx].2;
                let d = x[k] - lv[idx].0;
                e += (h[k] * d * d) as f64;
            }
            if e < best {
                best = e;
                ba = a;
                bb = b;
                std::mem::swap(&mut self.t1, &mut self.bt1);
                std::mem::swap(&mut self.t2, &mut self.bt2);
            } else {
                break;
            }
        }
        (ba, bb, best)
    }

    /// Predator error contribution: FP16 rounding of the kept values.
    fn pred_err(x: &[f32], h: &[f32], preds: &[usize]) -> f64 {
        preds.iter().map(|&k| {
            let d = x[k] as f64 - f16::from_f32(x[k]).to_f64();
            h[k] as f64 * d * d
        }).sum()
    }

    /// Greedy predator sequence: up to `max_m` positions, each the largest weighted error
    /// under the one-plane fit without the ones before it. Also returns the one-plane error
    /// after each count in `PREDATOR_COUNTS` (INFINITY where not reachable). Works on a
    /// compacted list sorted by |x| (removal = one shift), so every scan is contiguous.
    fn predator_sequence(&mut self, x: &[f32], h: &[f32], max_m: usize) -> (Vec<usize>, [f64; NM]) {
        let n = x.len();
        self.excluded.clear();
        self.excluded.resize(n, false);
        self.t1.resize(n, 0);
        self.t2.resize(n, 0);
        let mut order = std::mem::take(&mut self.order);
        Self::sort_order(&mut order, x);
        self.order = order;
        // (|x|, h, h|x|, original index) in descending |x|.
        let mut list: Vec<(f32, f32, f64, usize)> = self.order.iter()
            .map(|&k| (x[k].abs(), h[k], h[k] as f64 * x[k].abs() as f64, k)).collect();
        let mut seq = Vec::with_capacity(max_m);
        let mut e1 = [f64::INFINITY; NM];
        let mut total = Self::total(x, h, &self.excluded);
        let mut perr = 0f64;
        for m in 0..=max_m {
            let (mut a, mut hs) = (0f64, 0f64);
            let (mut best_gain, mut support, mut best_a, mut best_h) = (0f64, 0usize, 0f64, 0f64);
            for (i, &(_, hk, hax, _)) in list.iter().enumerate() {
                a += hax;
                hs += hk as f64;
                if hs > 0.0 && a * a > best_gain * hs {
                    best_gain = a * a / hs;
                    support = i + 1;
                    best_a = a;
                    best_h = hs;
                }
            }
            let s = if support > 0 { round_f16(best_a / best_h) } else { 0.0 };
            let err = (total - 2.0 * s as f64 * best_a + (s as f64) * (s as f64) * best_h).max(0.0);
            if let Some(ci) = PREDATOR_COUNTS.iter().position(|&c| c == m) {
                e1[ci] = err + perr;
            }
            if m == max_m || list.is_empty() {
                break;
            }
            // Largest weighted error: h (|x| - s)^2 inside the support, h x^2 outside.
            let mut best = (-1f32, 0usize);
            for (i, &(ax, hk, _, _)) in list.iter().enumerate() {
                let d = if i < support { ax - s } else { ax };
                let e = hk * d * d;
                if e > best.0 {
                    best = (e, i);
                }
            }
            let (ax, hk, _, k) = list.remove(best.1);
            self.excluded[k] = true;
            total -= hk as f64 * (ax as f64) * (ax as f64);
            let d = x[k] as f64 - f16::from_f32(x[k]).to_f64();
            perr += hk as f64 * d * d;
            seq.push(k);
        }
        (seq, e1)
    }

    fn set_excluded(&mut self, n: usize, preds: &[usize]) {
        self.excluded.clear();
        self.excluded.resize(n, false);
        for &k in preds {
            self.excluded[k] = true;
        }
    }

    /// Errors of every (predator count, planes) option of one block: `[planes-1][count idx]`.
    /// One-plane errors are exact. Two-plane errors are upper bounds of what `fit` returns:
    /// the m = 0 joint fit with the predators' own errors taken out (`fit` then refines, which
    /// can only lower the error).
    pub(crate) fn block_stats(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
        let max_m = if cfg.allow_predators { PREDATOR_COUNTS[NM - 1].min(x.len()) } else { 0 };
        let (seq, e1) = self.predator_sequence(x, h, max_m);
        let mut out = [[f32::INFINITY; NM]; 2];
        for ci in 0..NM {
            out[0][ci] = e1[ci] as f32;
        }
        if cfg.allow_plane2 {
            // Fewer refinements than `fit` does: `fit` continues the same sequence, so these
            // stay upper bounds.
            self.set_excluded(x.len(), &[]);
            let (a, b, e0) = self.two_planes(x, h, cfg.joint_iters.min(STATS_ITERS));
            let mut removed = 0f64;
            let mut m = 0;
            for (ci, &cnt) in PREDATOR_COUNTS.iter().enumerate() {
                if cnt > seq.len() {
                    break;
                }
                while m < cnt {
                    let k = seq[m];
                    let d = x[k] as f64 - a as f64 * self.t1[k] as f64 - b as f64 * self.t2[k] as f64;
                    removed += h[k] as f64 * d * d;
                    m += 1;
                }
                out[1][ci] = ((e0 - removed).max(0.0) + Self::pred_err(x, h, &seq[..cnt])) as f32;
            }
        }
        out
    }

    /// The fit of one block with `m` predators (a count from `PREDATOR_COUNTS`) and 1 or 2 planes.
    pub(crate) fn fit(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> BlockFit {
        let (seq, _) = self.predator_sequence(x, h, m.min(x.len()));
        let n = x.len();
        let (s1, s2, err) = if planes == 2 {
            // Same start as `block_stats`, then predators out and refined from there.
            self.set_excluded(n, &[]);
            let (a, b, _) = self.two_planes(x, h, cfg.joint_iters);
            self.set_excluded(n, &seq);
            for &k in &seq {
                self.t1[k] = 0;
                self.t2[k] = 0;
            }
            self.refine(x, h, a, b, cfg.joint_iters.max(1))
        } else {
            self.set_excluded(n, &seq);
            let (s, e) = Self::ternary(x, h, &self.excluded, &self.order, &mut self.t1);
            self.t2.iter_mut().for_each(|c| *c = 0);
            (s, 0.0, e)
        };
        let mut preds: Vec<(usize, f16)> = seq.iter().map(|&k| (k, f16::from_f32(x[k]))).collect();
        preds.sort_by_key(|p| p.0);
        BlockFit { s1, s2, t1: self.t1.clone(), t2: self.t2.clone(), err: err + Self::pred_err(x, h, &seq), preds }
    }
}
