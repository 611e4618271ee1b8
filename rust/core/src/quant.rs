//! Quantizer: dense float weights -> `PackedMatrix` within a bit budget.
//!
//! Every choice minimises the (importance-)weighted squared error `sum_k h_k (w_k - q_k)^2`
//! (h = 1 without importance):
//!
//! * **Plane 1, per block: the exact optimal ternary.** For a fixed support S the best scale is
//!   `s = sum_S h|w| / sum_S h` and the error is `sum h w^2 - (sum_S h|w|)^2 / sum_S h`; for a
//!   fixed s an element belongs to S iff `|w| > s/2`, so the optimum is a top-k set by `|w|`.
//!   Sorting `|w|` once and scanning k finds it exactly (tested against brute force).
//! * **Predators, by the error they remove.** Greedily, the weight with the largest weighted
//!   error under the current fit becomes a predator (kept in FP16, code 0), and the block is
//!   refitted without it. This gives nested predator sets per block and their exact errors.
//! * **Plane 2, fitted jointly.** Start from the residual fit (optimal ternary of `w - s1 t1`),
//!   then alternate: assign each weight the nearest of the 9 levels `a t1 + b t2`, and solve the
//!   2x2 weighted least squares for (a, b). Each step cannot increase the error.
//! * **One budget per matrix.** Every (group, block) cell may take a second plane
//!   (`B + 12` bytes) and every row-block some predators (4 or 6 bytes each). A Lagrange
//!   multiplier (error removed per bit) is searched so the whole matrix lands at or under the
//!   budget; each cell then takes the choice that is best at that price.

use crate::format::{pack_digits, Dims, FormatError, PackedMatrix, ROWS_PER_GROUP, ZERO_CODE_BYTE};
use half::f16;
use rayon::prelude::*;

/// Predator counts a row-block may take (nested sets, chosen greedily).
pub const PREDATOR_COUNTS: [usize; 7] = [0, 1, 2, 3, 4, 6, 8];
const NM: usize = PREDATOR_COUNTS.len();
/// Joint-fit refinements used when estimating options (the final fit uses `joint_iters`).
const STATS_ITERS: usize = 2;
/// Largest magnitude an FP16 scale or predator can hold.
pub const F16_MAX: f32 = 65504.0;

/// Settings of one compression.
#[derive(Clone, Debug)]
pub struct QuantConfig {
    /// Budget: bits per weight, every stored byte counted (FORMAT.md).
    pub bits: f64,
    /// Block size B (32, 64, 128, 256).
    pub block_size: usize,
    /// Alternating refinements of the joint two-plane fit (0 = plane 2 fits the residual only).
    pub joint_iters: usize,
    /// Allow plane-2 entries.
    pub allow_plane2: bool,
    /// Allow predators.
    pub allow_predators: bool,
}

impl QuantConfig {
    /// Defaults for everything but the budget and block size.
    pub fn new(bits: f64, block_size: usize) -> Self {
        QuantConfig { bits, block_size, joint_iters: 4, allow_plane2: true, allow_predators: true }
    }
}

/// Errors of the quantizer: unusable weights, importance or budget.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// Bad values (NaN/Inf, out of FP16 range, negative importance, budget too small).
    #[error("{0}")]
    Value(String),
    /// Lengths that do not match the stated shape.
    #[error("{0}")]
    Shape(String),
    /// Shape parameters the format cannot hold.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The weighted fit of one block: one or two ternary planes and predators.
#[derive(Clone, Debug, Default)]
pub struct BlockFit {
    /// Plane-1 scale (FP16-rounded).
    pub s1: f32,
    /// Plane-2 scale (FP16-rounded; 0 when one plane).
    pub s2: f32,
    /// Plane-1 codes, -1/0/+1, one per block column.
    pub t1: Vec<i8>,
    /// Plane-2 codes.
    pub t2: Vec<i8>,
    /// Predator positions (in-block column) with FP16 values, ascending by column.
    pub preds: Vec<(usize, f16)>,
    /// Weighted squared error of the whole block, predators included.
    pub err: f64,
}

/// Reusable scratch for fitting blocks of up to 256 weights.
pub struct Fitter {
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
    pub fn new() -> Fitter {
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
    fn ternary(x: &[f32], h: &[f32], excluded: &[bool], order: &[usize], t: &mut [i8]) -> (f32, f64) {
        let (k, s, e) = Self::ternary_scan(x, h, excluded, order, Self::total(x, h, excluded));
        Self::ternary_codes(x, excluded, order, k, t);
        (s, e)
    }

    fn sort_order(order: &mut Vec<usize>, v: &[f32]) {
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
    pub fn block_stats(&mut self, x: &[f32], h: &[f32], cfg: &QuantConfig) -> [[f32; NM]; 2] {
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
    pub fn fit(&mut self, x: &[f32], h: &[f32], m: usize, planes: usize, cfg: &QuantConfig) -> BlockFit {
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

/// Fits the same block of many rows with given options: `w` is [rows, len] (len <= 256),
/// `h` its [len] importance, `planes[r]` 1 or 2 and `npred[r]` the predator count of row r.
/// Used by error-feedback passes that choose the options first and the codes column by column.
pub fn fit_block_rows(w: &[f32], len: usize, h: &[f32], planes: &[u8], npred: &[u8], cfg: &QuantConfig) -> Result<Vec<BlockFit>, QuantError> {
    let rows = planes.len();
    if len == 0 || len > 256 || w.len() != rows * len || h.len() != len || npred.len() != rows {
        return Err(QuantError::Shape(format!(
            "fit_block_rows: w has {} values, h {}, planes {}, npred {}; expected [rows, len] with 1 <= len <= 256, [len], [rows], [rows]",
            w.len(), h.len(), planes.len(), npred.len())));
    }
    if let Some(r) = planes.iter().position(|p| *p != 1 && *p != 2) {
        return Err(QuantError::Value(format!("planes[{r}] = {}; expected 1 or 2", planes[r])));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite() || v.abs() > F16_MAX) {
        return Err(QuantError::Value(format!("w[{}, {}] = {}; expected finite values with |w| <= 65504", i / len, i % len, w[i])));
    }
    if let Some(i) = h.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(QuantError::Value(format!("h[{i}] = {}; expected finite values >= 0", h[i])));
    }
    Ok((0..rows).into_par_iter().map_init(Fitter::new, |f, r| {
        f.fit(&w[r * len..(r + 1) * len], h, npred[r] as usize, planes[r] as usize, cfg)
    }).collect())
}

/// Checks shape and values of the weights and importance.
fn check_weights(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, block_size: usize) -> Result<Dims, QuantError> {
    if !crate::format::BLOCK_SIZES.contains(&block_size) {
        return Err(QuantError::Value(format!("block_size is {block_size}; expected one of 32, 64, 128, 256")));
    }
    if rows == 0 || cols == 0 {
        return Err(QuantError::Shape(format!("weight is {rows}x{cols}; compress needs at least 1 row and 1 column")));
    }
    if w.len() != rows * cols {
        return Err(QuantError::Shape(format!("weight has {} values; expected {rows}x{cols}", w.len())));
    }
    let bad = w.par_iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let first = w.iter().position(|v| !v.is_finite()).unwrap_or(0);
        let nan = w.par_iter().filter(|v| v.is_nan()).count();
        return Err(QuantError::Value(format!(
            "weight has {bad} non-finite values ({nan} NaN, {} Inf; first at row {}, col {}); compress needs finite values",
            bad - nan, first / cols, first % cols)));
    }
    let big = w.par_iter().map(|v| v.abs()).reduce(|| 0.0, f32::max);
    if big > F16_MAX {
        let first = w.iter().position(|v| v.abs() > F16_MAX).unwrap_or(0);
        return Err(QuantError::Value(format!(
            "weight has |w| up to {big:e} (first at row {}, col {}); the format keeps scales and predators in FP16, so |w| must be <= 65504: rescale the matrix first",
            first / cols, first % cols)));
    }
    if let Some(h) = importance {
        if h.len() != cols {
            return Err(QuantError::Shape(format!("importance has length {}; expected K = {cols}", h.len())));
        }
        if let Some(i) = h.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(QuantError::Value(format!("importance[{i}] = {}; expected finite values >= 0", h[i])));
        }
        if h.iter().all(|v| *v == 0.0) {
            return Err(QuantError::Value("importance is all zero; expected at least one positive value".into()));
        }
    }
    Ok(Dims::new(rows, cols, block_size)?)
}

/// Checks the budget of `compress` against the fixed cost of plane 1.
fn check_budget(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<Dims, QuantError> {
    let d = check_weights(w, rows, cols, importance, cfg.block_size)?;
    if !cfg.bits.is_finite() || cfg.bits <= 0.0 {
        return Err(QuantError::Value(format!("bits = {}; expected a positive number of bits per weight", cfg.bits)));
    }
    let min_bits = 8.0 * d.fixed_bytes() as f64 / (rows as f64 * cols as f64);
    if cfg.bits < min_bits {
        return Err(QuantError::Value(format!(
            "bits = {} is below the minimum {min_bits:.4} for a {rows}x{cols} matrix with block_size {} (plane-1 codes at 1.6 bits + FP16 block scales + pointers); raise bits or the block size",
            cfg.bits, cfg.block_size)));
    }
    Ok(d)
}

/// Block `b` of row `r`: weights and importance, `len <= B` (the last block may be short).
fn block_slices<'a>(w: &'a [f32], h: &'a [f32], d: &Dims, r: usize, b: usize) -> (&'a [f32], &'a [f32]) {
    let k0 = b * d.block_size;
    let k1 = (k0 + d.block_size).min(d.cols);
    (&w[r * d.cols + k0..r * d.cols + k1], &h[k0..k1])
}

/// Per (group, block) decision at price `lambda` (error per bit): (plane2, counts per row),
/// with its bit cost.
fn decide(stats: &[[[f32; NM]; 2]], rows_in_group: usize, lambda: f64, pred_bits: f64, entry_bits: f64, allow_p2: bool) -> (bool, [u8; ROWS_PER_GROUP], f64) {
    let mut best = (false, [0u8; ROWS_PER_GROUP], f64::INFINITY, 0f64);
    for planes in 0..(if allow_p2 { 2 } else { 1 }) {
        let mut cost = if planes == 1 { lambda * entry_bits } else { 0.0 };
        let mut bits = if planes == 1 { entry_bits } else { 0.0 };
        let mut counts = [0u8; ROWS_PER_GROUP];
        for (i, st) in stats.iter().enumerate().take(rows_in_group) {
            let mut bc = (f64::INFINITY, 0usize);
            for (ci, &m) in PREDATOR_COUNTS.iter().enumerate() {
                let c = st[planes][ci] as f64 + lambda * pred_bits * m as f64;
                if c < bc.0 {
                    bc = (c, ci);
                }
            }
            cost += bc.0;
            bits += pred_bits * PREDATOR_COUNTS[bc.1] as f64;
            counts[i] = bc.1 as u8;
        }
        if cost < best.2 {
            best = (planes == 1, counts, cost, bits);
        }
    }
    (best.0, best.1, best.3)
}

/// The importance to weight errors with: the given one, or all ones (plain squared error).
fn importance_or_ones(importance: Option<&[f32]>, cols: usize) -> std::borrow::Cow<'_, [f32]> {
    match importance {
        Some(h) => std::borrow::Cow::Borrowed(h),
        None => std::borrow::Cow::Owned(vec![1f32; cols]),
    }
}

/// Errors of every option of every row-block of one matrix: everything the bit allocation
/// needs. Built once; `total_bits(lambda)` / `encode(lambda)` then price any trade-off, so a
/// caller can also spread one budget over many matrices with a shared `lambda`.
pub struct Analysis {
    /// Shape parameters.
    pub dims: Dims,
    stats: Vec<[[f32; NM]; 2]>,
    allow_plane2: bool,
}

impl Analysis {
    /// Fits every option of every block of `w` (float32 [rows, cols], row-major).
    pub fn new(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<Analysis, QuantError> {
        let d = check_weights(w, rows, cols, importance, cfg.block_size)?;
        let h = importance_or_ones(importance, cols);
        let h: &[f32] = &h;
        let nb = d.n_blocks;
        let stats: Vec<[[f32; NM]; 2]> = (0..rows)
            .into_par_iter()
            .flat_map_iter(|r| {
                let mut f = Fitter::new();
                (0..nb).map(move |blk| {
                    let (x, hh) = block_slices(w, h, &d, r, blk);
                    f.block_stats(x, hh, cfg)
                }).collect::<Vec<_>>()
            })
            .collect();
        Ok(Analysis { dims: d, stats, allow_plane2: cfg.allow_plane2 })
    }

    fn cell(&self, gi: usize, blk: usize) -> ([[[f32; NM]; 2]; ROWS_PER_GROUP], usize) {
        let (rows, nb) = (self.dims.rows, self.dims.n_blocks);
        let mut s = [[[f32::INFINITY; NM]; 2]; ROWS_PER_GROUP];
        let n = (rows - gi * ROWS_PER_GROUP).min(ROWS_PER_GROUP);
        for (i, si) in s.iter_mut().enumerate().take(n) {
            *si = self.stats[(gi * ROWS_PER_GROUP + i) * nb + blk];
        }
        (s, n)
    }

    fn decide_cell(&self, c: usize, lambda: f64) -> (bool, [u8; ROWS_PER_GROUP], f64, f64) {
        let nb = self.dims.n_blocks;
        let (s, n) = self.cell(c / nb, c % nb);
        let (p2, counts, bits) = decide(&s, n, lambda, 8.0 * self.dims.predator_bytes() as f64,
                                        8.0 * self.dims.p2_entry_bytes() as f64, self.allow_plane2);
        let err: f64 = (0..n).map(|i| s[i][p2 as usize][counts[i] as usize] as f64).sum();
        (p2, counts, bits, err)
    }

    /// Total stored bits (every array) when each cell takes its best choice at price `lambda`
    /// (error removed per bit). Non-increasing in `lambda`.
    pub fn total_bits(&self, lambda: f64) -> f64 {
        let d = &self.dims;
        8.0 * d.fixed_bytes() as f64
            + (0..d.n_groups * d.n_blocks).into_par_iter().map(|c| self.decide_cell(c, lambda).2).sum::<f64>()
    }

    /// The estimated weighted squared error at price `lambda` (an upper bound of what
    /// `encode(lambda)` gives).
    pub fn error(&self, lambda: f64) -> f64 {
        let d = &self.dims;
        (0..d.n_groups * d.n_blocks).into_par_iter().map(|c| self.decide_cell(c, lambda).3).sum()
    }

    /// Bits of the cheapest matrix (plane 1 only, no predators).
    pub fn min_bits(&self) -> f64 {
        8.0 * self.dims.fixed_bytes() as f64
    }

    /// A price above which nothing beyond plane 1 is worth buying.
    pub fn max_lambda(&self) -> f64 {
        self.stats.par_iter().map(|s| s[0][0] as f64).reduce(|| 0.0, f64::max).max(1e-30)
    }

    /// The smallest price whose choices fit in `budget_bits` (total stored bits).
    pub fn lambda_for_budget(&self, budget_bits: f64) -> f64 {
        if self.total_bits(0.0) <= budget_bits {
            return 0.0;
        }
        let mut hi = self.max_lambda();
        // At a high enough price only plane 1 is bought; a budget below that is unreachable
        // and gets the plane-1-only encoding (callers check the minimum first).
        for _ in 0..200 {
            if self.total_bits(hi) <= budget_bits {
                break;
            }
            hi *= 4.0;
        }
        let mut lo = hi * 1e-12;
        if self.total_bits(lo) <= budget_bits {
            lo = 0.0;
        }
        for _ in 0..60 {
            let mid = if lo == 0.0 { hi * 1e-12 } else { (lo * hi).sqrt() };
            if self.total_bits(mid) <= budget_bits {
                hi = mid;
            } else {
                lo = mid;
            }
            if hi / lo.max(1e-300) < 1.0 + 1e-6 {
                break;
            }
        }
        hi
    }
}

/// Compresses `w` (float32 [rows, cols], row-major) to at most `cfg.bits` bits per weight.
/// `importance` ([cols], >= 0) weights the squared error per input column.
pub fn compress(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    check_budget(w, rows, cols, importance, cfg)?;
    let a = Analysis::new(w, rows, cols, importance, cfg)?;
    // Whole bits, never below the fixed part (`check_budget` has ensured bits >= the minimum;
    // the floor could otherwise drop a just-sufficient budget under it).
    let lambda = a.lambda_for_budget((cfg.bits * rows as f64 * cols as f64).floor().max(a.min_bits()));
    let p = encode(w, importance, &a, lambda, cfg)?;
    if p.bits_per_weight() > cfg.bits + 1e-12 {
        return Err(QuantError::Value(format!(
            "internal: result has {:.4} bits per weight over the budget {}", p.bits_per_weight(), cfg.bits)));
    }
    Ok(p)
}

/// Encodes `w` with the choices each cell makes at price `lambda` (see `Analysis`).
pub fn encode(w: &[f32], importance: Option<&[f32]>, a: &Analysis, lambda: f64, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    let d = a.dims;
    let (rows, cols, g, nb, b) = (d.rows, d.cols, d.n_groups, d.n_blocks, d.block_size);
    if w.len() != rows * cols || importance.is_some_and(|h| h.len() != cols) {
        return Err(QuantError::Shape("encode: weight/importance do not match the analysis".into()));
    }
    let h = importance_or_ones(importance, cols);
    let h: &[f32] = &h;
    // 3. Encode each group with the chosen options.
    struct GroupOut {
        codes: Vec<u8>,
        scales: Vec<(usize, f16)>,
        p2: Vec<(u16, [f16; ROWS_PER_GROUP], Vec<u8>)>,
        preds: Vec<Vec<(u32, f16)>>,
    }
    let kp = d.padded_cols;
    let groups: Vec<GroupOut> = (0..g).into_par_iter().map(|gi| {
        let mut f = Fitter::new();
        let n = (rows - gi * ROWS_PER_GROUP).min(ROWS_PER_GROUP);
        let mut out = GroupOut { codes: vec![ZERO_CODE_BYTE; kp], scales: vec![], p2: vec![], preds: vec![vec![]; n] };
        let mut digits1 = vec![[1u8; ROWS_PER_GROUP]; kp];
        for blk in 0..nb {
            let (p2, counts, _, _) = a.decide_cell(gi * nb + blk, lambda);
            let mut digits2 = vec![[1u8; ROWS_PER_GROUP]; b];
            let mut s2 = [f16::ZERO; ROWS_PER_GROUP];
            for i in 0..n {
                let r = gi * ROWS_PER_GROUP + i;
                let (x, hh) = block_slices(w, h, &d, r, blk);
                let fit = f.fit(x, hh, PREDATOR_COUNTS[counts[i] as usize], if p2 { 2 } else { 1 }, cfg);
                out.scales.push((r * nb + blk, f16::from_f32(fit.s1)));
                for (kk, &t) in fit.t1.iter().enumerate() {
                    digits1[blk * b + kk][i] = (t + 1) as u8;
                }
                if p2 {
                    s2[i] = f16::from_f32(fit.s2);
                    for (kk, &t) in fit.t2.iter().enumerate() {
                        digits2[kk][i] = (t + 1) as u8;
                    }
                }
                for (kk, v) in fit.preds {
                    out.preds[i].push(((blk * b + kk) as u32, v));
                }
            }
            if p2 {
                out.p2.push((blk as u16, s2, digits2.iter().map(|dg| pack_digits(*dg)).collect()));
            }
        }
        out.codes = digits1.iter().map(|dg| pack_digits(*dg)).collect();
        out
    }).collect();
    // 4. Assemble the arrays.
    let mut p = PackedMatrix {
        rows,
        cols,
        block_size: b,
        codes: Vec::with_capacity(g * kp),
        scales: vec![f16::ZERO; rows * nb],
        p2_ptr: vec![0],
        p2_block: vec![],
        p2_scales: vec![],
        p2_codes: vec![],
        out_ptr: vec![0],
        out_cols: vec![],
        out_vals: vec![],
    };
    for go in groups {
        p.codes.extend_from_slice(&go.codes);
        for (i, s) in go.scales {
            p.scales[i] = s;
        }
        for (blk, s2, codes) in go.p2 {
            p.p2_block.push(blk);
            p.p2_scales.extend_from_slice(&s2);
            p.p2_codes.extend_from_slice(&codes);
        }
        p.p2_ptr.push(p.p2_block.len() as u32);
        for row in go.preds {
            for (c, v) in row {
                p.out_cols.push(c);
                p.out_vals.push(v);
            }
            p.out_ptr.push(p.out_vals.len() as u32);
        }
    }
    debug_assert!(p.validate().is_ok());
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f32 {
            let (u, v) = (self.next().max(1e-12), self.next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        }
    }

    /// Brute force over all 3^n ternary codes (scale by weighted LS for each code).
    fn brute_ternary(x: &[f32], h: &[f32]) -> f64 {
        let n = x.len();
        let mut best = f64::INFINITY;
        for code in 0..3usize.pow(n as u32) {
            let mut c = code;
            let t: Vec<f64> = (0..n).map(|_| { let v = (c % 3) as f64 - 1.0; c /= 3; v }).collect();
            let num: f64 = (0..n).map(|k| h[k] as f64 * t[k] * x[k] as f64).sum();
            let den: f64 = (0..n).map(|k| h[k] as f64 * t[k] * t[k]).sum();
            let s = if den > 0.0 { num / den } else { 0.0 };
            let e: f64 = (0..n).map(|k| { let d = x[k] as f64 - s * t[k]; h[k] as f64 * d * d }).sum();
            best = best.min(e);
        }
        best
    }

    #[test]
    fn ternary_is_optimal_against_brute_force() {
        let mut rng = Rng(0x9E3779B97F4A7C15);
        for trial in 0..300 {
            let n = 1 + trial % 8;
            let x: Vec<f32> = (0..n).map(|_| rng.normal() * if trial % 5 == 0 { 100.0 } else { 1.0 }).collect();
            let h: Vec<f32> = (0..n).map(|_| if trial % 2 == 0 { 1.0 } else { rng.next() as f32 * 3.0 }).collect();
            let mut order = vec![];
            Fitter::sort_order(&mut order, &x);
            let mut t = vec![0i8; n];
            let (s, e) = Fitter::ternary(&x, &h, &vec![false; n], &order, &mut t);
            let bf = brute_ternary(&x, &h);
            // Our scale is rounded to FP16 (rel. 2^-11), which can only add a tiny error.
            let tol = 1e-9 + 1e-5 * x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            assert!(e <= bf + tol && e >= bf - 1e-6 * (1.0 + bf), "trial {trial}: ours {e} brute {bf} (s={s})");
        }
    }

    #[test]
    fn joint_two_planes_beat_residual_and_one_plane() {
        let mut rng = Rng(42);
        let mut f = Fitter::new();
        let (mut e1s, mut eres, mut ejoint) = (0.0, 0.0, 0.0);
        for _ in 0..200 {
            let x: Vec<f32> = (0..64).map(|_| rng.normal()).collect();
            let h = vec![1f32; 64];
            let mut cfg = QuantConfig::new(4.0, 64);
            e1s += f.fit(&x, &h, 0, 1, &cfg).err;
            cfg.joint_iters = 0;
            let r = f.fit(&x, &h, 0, 2, &cfg).err;
            cfg.joint_iters = 4;
            let j = f.fit(&x, &h, 0, 2, &cfg).err;
            assert!(j <= r + 1e-9);
            eres += r;
            ejoint += j;
        }
        assert!(eres < 0.5 * e1s, "two planes should at least halve the error: {eres} vs {e1s}");
        assert!(ejoint <= eres);
    }

    #[test]
    fn budget_respected_and_monotone() {
        let mut rng = Rng(7);
        let (n, k) = (37, 200);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal().powi(3)).collect();
        let mut last = f64::INFINITY;
        for bits in [2.75, 3.0, 3.4, 3.8, 4.5, 5.5] {
            let p = compress(&w, n, k, None, &QuantConfig::new(bits, 32)).unwrap();
            p.validate().unwrap();
            assert!(p.bits_per_weight() <= bits, "{} > {bits}", p.bits_per_weight());
            let wd = p.decompress();
            let err: f64 = w.iter().zip(&wd).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            assert!(err <= last * 1.0001, "error grew with more bits: {err} > {last} at {bits}");
            last = err;
        }
    }

    #[test]
    fn budget_exactly_at_the_minimum_terminates() {
        // 1 x 84 with B = 32: fixed part is 96 + 6 + 8 + 8 bytes; bits * N * K is not whole.
        let w: Vec<f32> = (0..84).map(|i| (i as f32 * 0.37).sin()).collect();
        let bits = 8.0 * (96 + 6 + 8 + 8) as f64 / 84.0;
        let p = compress(&w, 1, 84, None, &QuantConfig::new(bits, 32)).unwrap();
        assert!(p.bits_per_weight() <= bits + 1e-12);
    }

    #[test]
    fn rejects_bad_input() {
        let cfg = QuantConfig::new(3.0, 64);
        let mut w = vec![0.5f32; 10 * 70];
        w[7 * 70 + 12] = f32::NAN;
        let e = compress(&w, 10, 70, None, &cfg).unwrap_err().to_string();
        assert!(e.contains("row 7, col 12") && e.contains("1 NaN"), "{e}");
        let w = vec![0.5f32; 10 * 70];
        assert!(compress(&w, 10, 70, None, &QuantConfig::new(1.0, 64)).unwrap_err().to_string().contains("below the minimum"));
        assert!(compress(&w, 10, 70, Some(&[1.0; 69]), &cfg).is_err());
        assert!(compress(&w, 10, 70, None, &QuantConfig::new(3.0, 48)).is_err());
        assert!(compress(&w, 0, 70, None, &cfg).is_err());
    }

    #[test]
    fn importance_focuses_error() {
        let mut rng = Rng(3);
        let (n, k) = (20, 128);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let mut h = vec![0.01f32; k];
        for v in h.iter_mut().take(16) {
            *v = 100.0;
        }
        let plain = compress(&w, n, k, None, &QuantConfig::new(2.5, 64)).unwrap().decompress();
        let aware = compress(&w, n, k, Some(&h), &QuantConfig::new(2.5, 64)).unwrap().decompress();
        let werr = |q: &[f32]| -> f64 { (0..n * k).map(|i| h[i % k] as f64 * ((w[i] - q[i]) as f64).powi(2)).sum() };
        assert!(werr(&aware) < werr(&plain), "{} vs {}", werr(&aware), werr(&plain));
    }
}
