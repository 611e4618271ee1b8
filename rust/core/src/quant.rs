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

use crate::format::{add_row_codes, row_scale_for, scale_code, Dims, FormatError, PackedMatrix, ROWS_PER_GROUP, ZERO_CODE_BYTE};
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

mod fitter;
#[cfg(test)]
mod reference;

pub use fitter::Fitter;
use fitter::BlockRecord;

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
    Ok(crate::cpu::run_in_pool(|| (0..rows).into_par_iter().map_init(Fitter::new, |f, r| {
        f.fit(&w[r * len..(r + 1) * len], h, npred[r] as usize, planes[r] as usize, cfg)
    }).collect()))
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
    // One pass: the largest |w| as bits (IEEE magnitudes order as integers; Inf and NaN have
    // all exponent bits set, so they come out above every finite value).
    let top = w.par_chunks(1 << 14).map(|c| c.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF))).reduce(|| 0, u32::max);
    if top >= f32::INFINITY.to_bits() {
        let bad = w.par_iter().filter(|v| !v.is_finite()).count();
        let first = w.iter().position(|v| !v.is_finite()).unwrap_or(0);
        let nan = w.par_iter().filter(|v| v.is_nan()).count();
        return Err(QuantError::Value(format!(
            "weight has {bad} non-finite values ({nan} NaN, {} Inf; first at row {}, col {}); compress needs finite values",
            bad - nan, first / cols, first % cols)));
    }
    let big = f32::from_bits(top);
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
            "bits = {} is below the minimum {min_bits:.4} for a {rows}x{cols} matrix with block_size {} (plane-1 codes at 1.6 bits + 8-bit block scales + FP16 row scales + pointers); raise bits or the block size",
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
/// with its bit cost. `stats` holds the options of the group's rows.
fn decide(stats: &[&[[f32; NM]; 2]], lambda: f64, pred_bits: f64, entry_bits: f64, allow_p2: bool) -> (bool, [u8; ROWS_PER_GROUP], f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, all `decide_avx2` requires.
        return unsafe { decide_avx2(stats, lambda, pred_bits, entry_bits, allow_p2) };
    }
    decide_impl::<false>(stats, lambda, pred_bits, entry_bits, allow_p2)
}

/// `decide` with its per-row choice of predator count in AVX2 (`argmin_avx2`): the same sums,
/// so the same decisions (the bit allocation evaluates every cell ~20 times per matrix).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decide_avx2(stats: &[&[[f32; NM]; 2]], lambda: f64, pred_bits: f64, entry_bits: f64, allow_p2: bool) -> (bool, [u8; ROWS_PER_GROUP], f64) {
    decide_impl::<true>(stats, lambda, pred_bits, entry_bits, allow_p2)
}

#[inline(always)]
fn decide_impl<const SIMD: bool>(stats: &[&[[f32; NM]; 2]], lambda: f64, pred_bits: f64, entry_bits: f64, allow_p2: bool) -> (bool, [u8; ROWS_PER_GROUP], f64) {
    // lam_m[NM] = +inf pads the vector form to 8 lanes (never the minimum before a finite one).
    let lam_m: [f64; 8] = std::array::from_fn(|ci| if ci < NM { lambda * pred_bits * PREDATOR_COUNTS[ci] as f64 } else { f64::INFINITY });
    let mut best = (false, [0u8; ROWS_PER_GROUP], f64::INFINITY, 0f64);
    for planes in 0..(if allow_p2 { 2 } else { 1 }) {
        let mut cost = if planes == 1 { lambda * entry_bits } else { 0.0 };
        let mut bits = if planes == 1 { entry_bits } else { 0.0 };
        let mut counts = [0u8; ROWS_PER_GROUP];
        for (i, st) in stats.iter().enumerate() {
            let st = &st[planes];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: SIMD is true only in `decide_avx2`, whose caller checked AVX2.
            let bc = if SIMD { unsafe { argmin_avx2(st, &lam_m) } } else { argmin(st, &lam_m) };
            #[cfg(not(target_arch = "x86_64"))]
            let bc = argmin(st, &lam_m);
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

/// The cheapest predator count of one row-block at prices `lam_m`: (cost, index), the first
/// index on ties; (inf, 0) when no option is available.
#[inline(always)]
fn argmin(st: &[f32; NM], lam_m: &[f64; 8]) -> (f64, usize) {
    let mut bc = (f64::INFINITY, 0usize);
    for ci in 0..NM {
        let c = st[ci] as f64 + lam_m[ci];
        if c < bc.0 {
            bc = (c, ci);
        }
    }
    bc
}

/// `argmin` in AVX2: the 7 costs in two vectors of 4 doubles (the 8th is +inf), their minimum,
/// and the first lane equal to it; the same values and choice. Falls back to `argmin` if no
/// lane equals the minimum (NaN costs, which valid stats never have).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn argmin_avx2(st: &[f32; NM], lam_m: &[f64; 8]) -> (f64, usize) {
    use std::arch::x86_64::*;
    const { assert!(NM == 7) };
    // SAFETY (caller: AVX2): st[0..4] is in bounds; the masked load reads st[4..7] only.
    unsafe {
        let lo = _mm256_cvtps_pd(_mm_loadu_ps(st.as_ptr()));
        let hi = _mm256_cvtps_pd(_mm_maskload_ps(st.as_ptr().add(4), _mm_setr_epi32(-1, -1, -1, 0)));
        let a = _mm256_add_pd(lo, _mm256_loadu_pd(lam_m.as_ptr()));
        let b = _mm256_add_pd(hi, _mm256_loadu_pd(lam_m.as_ptr().add(4)));
        let m = _mm256_min_pd(a, b);
        let m = _mm256_min_pd(m, _mm256_permute2f128_pd::<1>(m, m));
        let m = _mm256_min_pd(m, _mm256_permute_pd::<5>(m));
        let eq = _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(a, m)) | (_mm256_movemask_pd(_mm256_cmp_pd::<_CMP_EQ_OQ>(b, m)) << 4);
        if eq == 0 {
            return argmin(st, lam_m);
        }
        (_mm256_cvtsd_f64(m), eq.trailing_zeros() as usize)
    }
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
    /// Per block (row-major over (row, block)): what `encode` needs to skip refitting, and the
    /// joint fits' codes, `B / 2` bytes per block. With the stats 144 bytes per block of 64
    /// (2.25 bytes per weight; 0.94 at B = 256), held while one matrix is compressed.
    records: Vec<BlockRecord>,
    joint_codes: Vec<u8>,
    allow_plane2: bool,
}

impl Analysis {
    /// Fits every option of every block of `w` (float32 [rows, cols], row-major).
    /// Runs in the crate's worker pool.
    pub fn new(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<Analysis, QuantError> {
        crate::cpu::run_in_pool(|| Self::new_in_pool(w, rows, cols, importance, cfg))
    }

    fn new_in_pool(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<Analysis, QuantError> {
        let d = check_weights(w, rows, cols, importance, cfg.block_size)?;
        Ok(Self::fit(w, d, importance, cfg))
    }

    /// The analysis of weights that `check_weights` accepted as `d` (in the pool).
    fn fit(w: &[f32], d: Dims, importance: Option<&[f32]>, cfg: &QuantConfig) -> Analysis {
        let h = importance_or_ones(importance, d.cols);
        let h: &[f32] = &h;
        let (rows, nb) = (d.rows, d.n_blocks);
        let cb = d.block_size / 2;
        // stats and records (~100 MB on 4096 x 14336) are written once, by the workers: not
        // filled first on this thread (that serial pass took ~50 ms of a ~1.3 s compress).
        // joint_codes is zeroed memory from the allocator (fresh pages: no pass either).
        let mut stats: Vec<[[f32; NM]; 2]> = Vec::with_capacity(rows * nb);
        let mut records: Vec<BlockRecord> = Vec::with_capacity(rows * nb);
        let mut joint_codes = vec![0u8; rows * nb * cb];
        let (st, rc) = (&mut stats.spare_capacity_mut()[..rows * nb], &mut records.spare_capacity_mut()[..rows * nb]);
        st.par_chunks_mut(nb).zip(rc.par_chunks_mut(nb)).zip(joint_codes.par_chunks_mut(nb * cb)).enumerate()
            .for_each_init(Fitter::new, |f, (r, ((out, rec), codes))| {
                for (blk, (o, rc)) in out.iter_mut().zip(rec.iter_mut()).enumerate() {
                    let (x, hh) = block_slices(w, h, &d, r, blk);
                    let (so, ro) = f.block_stats_record(x, hh, cfg, &mut codes[blk * cb..(blk + 1) * cb]);
                    o.write(so);
                    rc.write(ro);
                }
            });
        // SAFETY: the loop above wrote all rows * nb elements of both (every row r < rows, every
        // block < nb: the chunks of nb cover the rows * nb slots exactly); a panic in it would
        // unwind past this line, leaving both empty.
        unsafe {
            stats.set_len(rows * nb);
            records.set_len(rows * nb);
        }
        Analysis { dims: d, stats, records, joint_codes, allow_plane2: cfg.allow_plane2 }
    }

    /// The record of block `c` (= row * n_blocks + block) and its joint fit's codes.
    fn record(&self, c: usize) -> (&BlockRecord, &[u8]) {
        let cb = self.dims.block_size / 2;
        (&self.records[c], &self.joint_codes[c * cb..(c + 1) * cb])
    }

    /// Cell `c`'s choice at price `lambda`: (plane 2, predator count index per row, bits).
    fn decide_cell(&self, c: usize, lambda: f64) -> (bool, [u8; ROWS_PER_GROUP], f64) {
        let (s, n) = self.cell_stats(c);
        decide(&s[..n], lambda, 8.0 * self.dims.predator_bytes() as f64, 8.0 * self.dims.p2_entry_bytes() as f64, self.allow_plane2)
    }

    /// The stats of cell `c`'s rows: the first `n` (its group's rows that exist), and `n`.
    fn cell_stats(&self, c: usize) -> ([&[[f32; NM]; 2]; ROWS_PER_GROUP], usize) {
        let (rows, nb) = (self.dims.rows, self.dims.n_blocks);
        let (gi, blk) = (c / nb, c % nb);
        let n = (rows - gi * ROWS_PER_GROUP).min(ROWS_PER_GROUP);
        (std::array::from_fn(|i| &self.stats[(gi * ROWS_PER_GROUP + i.min(n - 1)) * nb + blk]), n)
    }

    /// Bits of every cell at price `lambda` (without the fixed part). Each is a whole number
    /// (bytes times 8), so their sums are exact in any order.
    fn cell_bits(&self, lambda: f64) -> Vec<f64> {
        let d = &self.dims;
        (0..d.n_groups * d.n_blocks).into_par_iter().map(|c| self.decide_cell(c, lambda).2).collect()
    }

    /// Total stored bits (every array) when each cell takes its best choice at price `lambda`
    /// (error removed per bit). Non-increasing in `lambda`.
    pub fn total_bits(&self, lambda: f64) -> f64 {
        crate::cpu::run_in_pool(|| self.priced(lambda).bits)
    }

    /// What price `lambda` buys: the total bits and each cell's.
    fn priced(&self, lambda: f64) -> Priced {
        let cells = self.cell_bits(lambda);
        Priced { lambda, bits: self.min_bits() + cells.iter().sum::<f64>(), cells }
    }

    /// The estimated weighted squared error at price `lambda` (an upper bound of what
    /// `encode(lambda)` gives).
    pub fn error(&self, lambda: f64) -> f64 {
        let d = &self.dims;
        crate::cpu::run_in_pool(|| (0..d.n_groups * d.n_blocks).into_par_iter().map(|c| {
            let (p2, counts, _) = self.decide_cell(c, lambda);
            let (st, n) = self.cell_stats(c);
            st[..n].iter().zip(counts).map(|(st, ci)| st[p2 as usize][ci as usize] as f64).sum::<f64>()
        }).sum())
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
    /// Runs in the crate's worker pool.
    pub fn lambda_for_budget(&self, budget_bits: f64) -> f64 {
        crate::cpu::run_in_pool(|| self.lambda_in_pool(budget_bits))
    }

    fn lambda_in_pool(&self, budget_bits: f64) -> f64 {
        if self.total_bits(0.0) <= budget_bits {
            return 0.0;
        }
        let (lo, hi) = match self.bracket_near(budget_bits) {
            Some(b) => b,
            None => self.bracket_full(budget_bits),
        };
        // Narrowed to a relative width of 1e-6, evaluating only the cells whose bits differ
        // between the bracket's ends (a cell's bits do not grow with the price, so the others
        // keep theirs inside). Should rounding ever break that, the full evaluation at the
        // price found tells, and the narrowing is redone without skipping cells.
        let found = self.narrow(budget_bits, &lo, &hi, true);
        if self.total_bits(found) <= budget_bits {
            return found;
        }
        self.narrow(budget_bits, &lo, &hi, false)
    }

    /// A bracket bits(hi) <= budget < bits(lo) close around the price: a rough price from a
    /// sample of the cells (every step-th, its bits scaled up; cheap), then a bracket 2 % either
    /// side of it, widened (squaring the factor) up to 8 times: (lo, hi), `None` where that
    /// does not bracket the budget.
    fn bracket_near(&self, budget_bits: f64) -> Option<(Priced, Priced)> {
        let fixed = self.min_bits();
        let n_cells = self.dims.n_groups * self.dims.n_blocks;
        let step = n_cells / 4096;
        if step < 4 {
            return None;
        }
        let scale = n_cells as f64 / n_cells.div_ceil(step) as f64;
        let estimate = |lambda: f64| {
            let sum: f64 = (0..n_cells).into_par_iter().step_by(step).map(|c| self.decide_cell(c, lambda).2).sum();
            fixed + scale * sum - budget_bits
        };
        let top = self.max_lambda();
        let (ftop, bottom) = (estimate(top), top * 1e-12);
        let fbottom = estimate(bottom);
        if ftop > 0.0 || fbottom <= 0.0 {
            return None;
        }
        let rough = false_position((bottom, fbottom), (top, ftop), 1e-3, estimate);
        let mut widen = 1.02f64;
        let (mut lo, mut hi) = (self.priced(rough / widen), self.priced(rough * widen));
        for _ in 0..8 {
            if hi.bits <= budget_bits && lo.bits > budget_bits {
                break;
            }
            widen *= widen;
            if hi.bits > budget_bits {
                let next = self.priced(hi.lambda * widen);
                lo = std::mem::replace(&mut hi, next);
            } else {
                let next = self.priced(lo.lambda / widen);
                hi = std::mem::replace(&mut lo, next);
            }
        }
        (hi.bits <= budget_bits && lo.bits > budget_bits).then_some((lo, hi))
    }

    /// A bracket bits(hi) <= budget < bits(lo) over the whole range: hi from the largest
    /// block error up (x4 at a time), lo 1e-12 of it or 0. A budget below the plane-1-only
    /// matrix is unreachable and gets that matrix (callers check the minimum first).
    fn bracket_full(&self, budget_bits: f64) -> (Priced, Priced) {
        let mut hi = self.priced(self.max_lambda());
        for _ in 0..200 {
            if hi.bits <= budget_bits {
                break;
            }
            hi = self.priced(hi.lambda * 4.0);
        }
        let mut lo = self.priced(hi.lambda * 1e-12);
        if lo.bits <= budget_bits {
            lo = self.priced(0.0);
        }
        (lo, hi)
    }

    /// Narrows the bracket bits(hi) <= budget < bits(lo) (or lo = 0) to a relative width of
    /// 1e-6 and returns its upper end. With `skip`, only the cells whose bits differ between the
    /// ends are evaluated inside (the rest keep them); the totals are the same where a cell's
    /// bits do not grow with the price.
    fn narrow(&self, budget_bits: f64, lo: &Priced, hi: &Priced, skip: bool) -> f64 {
        // The cells evaluated: (cell, bits at lo, bits at hi); the others' bits, with the fixed
        // part, in `settled`.
        let mut active: Vec<(u32, f64, f64)> = vec![];
        let mut settled = self.min_bits();
        for (c, (&l, &h)) in lo.cells.iter().zip(&hi.cells).enumerate() {
            if skip && l == h {
                settled += h;
            } else {
                active.push((c as u32, l, h));
            }
        }
        false_position((lo.lambda, lo.bits - budget_bits), (hi.lambda, hi.bits - budget_bits), 1e-6, |mid| {
            let bm: Vec<f64> = active.par_iter().map(|&(c, _, _)| self.decide_cell(c as usize, mid).2).collect();
            let f = settled + bm.iter().sum::<f64>() - budget_bits;
            // The new bracket's cells: those whose bits still differ between its ends.
            let mut next = Vec::with_capacity(active.len());
            for (&(c, l, h), &m) in active.iter().zip(&bm) {
                let (l, h) = if f <= 0.0 { (l, m) } else { (m, h) };
                if skip && l == h {
                    settled += m;
                } else {
                    next.push((c, l, h));
                }
            }
            active = next;
            f
        })
    }
}

/// A price (error removed per bit) with what it buys: the total stored bits and each cell's.
struct Priced {
    lambda: f64,
    bits: f64,
    cells: Vec<f64>,
}

/// The smallest price (to relative width `rel`) where `f` (bits over budget, non-increasing)
/// is <= 0, from a bracket f(lo) > 0 >= f(hi) (lo may be 0): false position on (ln lambda, f)
/// with the Illinois correction (the bits are a fine staircase in ln lambda, nearly smooth at
/// this scale: ~10 evaluations where bisection takes ~25), and a bisection step whenever the
/// bracket has not halved in two steps. Returns the bracket's upper end.
fn false_position((mut lo, mut fa): (f64, f64), (mut hi, mut fb): (f64, f64), rel: f64, mut f: impl FnMut(f64) -> f64) -> f64 {
    let (mut side, mut stall) = (0i8, 0u8);
    for _ in 0..200 {
        if hi / lo.max(1e-300) < 1.0 + rel {
            break;
        }
        let width = if lo > 0.0 { (hi / lo).ln() } else { f64::INFINITY };
        let mid = if lo == 0.0 {
            hi * 1e-12
        } else {
            let t = if stall >= 2 || fa <= fb { 0.5 } else { (fa / (fa - fb)).clamp(0.02, 0.98) };
            let m = (lo.ln() + t * width).exp();
            if m > lo && m < hi { m } else { (lo * hi).sqrt() }
        };
        let fm = f(mid);
        if fm <= 0.0 {
            hi = mid;
            fb = fm;
            if side == 1 {
                fa *= 0.5;
            }
            side = 1;
        } else {
            lo = mid;
            fa = fm;
            if side == -1 {
                fb *= 0.5;
            }
            side = -1;
        }
        let shrunk = lo > 0.0 && (hi / lo).ln() <= 0.5 * width;
        stall = if shrunk || stall >= 2 { 0 } else { stall + 1 };
    }
    hi
}

/// Compresses `w` (float32 [rows, cols], row-major) to at most `cfg.bits` bits per weight.
/// `importance` ([cols], >= 0) weights the squared error per input column.
/// Runs in the crate's worker pool (`cpu::set_num_threads` sets its size).
pub fn compress(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    crate::cpu::run_in_pool(|| compress_in_pool(w, rows, cols, importance, cfg))
}

fn compress_in_pool(w: &[f32], rows: usize, cols: usize, importance: Option<&[f32]>, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    let d = check_budget(w, rows, cols, importance, cfg)?;
    let a = Analysis::fit(w, d, importance, cfg);
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

/// Encodes `w` with the choices each cell makes at price `lambda` (see `Analysis`), from the
/// analysis' records (no refitting): `w` and `importance` must be the ones analysed.
/// Runs in the crate's worker pool.
pub fn encode(w: &[f32], importance: Option<&[f32]>, a: &Analysis, lambda: f64, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    crate::cpu::run_in_pool(|| encode_in_pool(w, importance, a, lambda, cfg))
}

fn encode_in_pool(w: &[f32], importance: Option<&[f32]>, a: &Analysis, lambda: f64, cfg: &QuantConfig) -> Result<PackedMatrix, QuantError> {
    let d = a.dims;
    let (rows, cols, g, nb, b) = (d.rows, d.cols, d.n_groups, d.n_blocks, d.block_size);
    if w.len() != rows * cols || importance.is_some_and(|h| h.len() != cols) {
        return Err(QuantError::Shape("encode: weight/importance do not match the analysis".into()));
    }
    let h = importance_or_ones(importance, cols);
    let h: &[f32] = &h;
    // 3. Encode each group with the chosen options.
    // The plane-1 codes, scales and row scales go straight into the matrix's arrays (each group
    // has its own part); plane 2 and the predators, whose sizes the choices decide, are
    // gathered per group and assembled after.
    struct GroupOut {
        /// Plane-2 entries: blocks, FP scales per row (codes once the row scales are known),
        /// then the codes; `B` code bytes each.
        p2_block: Vec<u16>,
        p2_scales: Vec<u8>,
        p2_codes: Vec<u8>,
        /// Predators per row, in column order.
        preds: Vec<Vec<(u32, f16)>>,
    }
    let kp = d.padded_cols;
    // Code bytes start at all digits 1 (t = 0, also for padding rows and columns), filled by
    // each group's worker (zeroed pages from the allocator until then, not a serial pass);
    // each row's codes go in by `add_row_codes`.
    let mut codes = vec![0u8; g * kp];
    let mut scales = vec![0u8; rows * nb];
    let mut row_scales = vec![f16::ZERO; rows];
    let parts = codes.par_chunks_mut(kp).zip(scales.par_chunks_mut(ROWS_PER_GROUP * nb)).zip(row_scales.par_chunks_mut(ROWS_PER_GROUP));
    let groups: Vec<GroupOut> = parts.enumerate().map(|(gi, ((codes_g, scales_g), row_scales_g))| {
        codes_g.fill(ZERO_CODE_BYTE);
        let mut f = Fitter::new();
        let n = (rows - gi * ROWS_PER_GROUP).min(ROWS_PER_GROUP);
        let mut out = GroupOut { p2_block: vec![], p2_scales: vec![], p2_codes: vec![], preds: vec![vec![]; n] };
        // Float scales first; they become 8-bit codes under each row's scale once the row is done.
        let mut s1 = vec![vec![0f32; nb]; n];
        let mut s2f: Vec<[f32; ROWS_PER_GROUP]> = vec![];
        for blk in 0..nb {
            // The next block's inputs of each row: they lie nb blocks apart, ~20 streams per
            // group, more than the hardware prefetchers follow.
            #[cfg(target_arch = "x86_64")]
            if blk + 1 < nb {
                for i in 0..n {
                    let c = (gi * ROWS_PER_GROUP + i) * nb + blk + 1;
                    let (rec, codes) = a.record(c);
                    crate::cpu::prefetch_code(rec);
                    crate::cpu::prefetch_code(codes.as_ptr());
                    crate::cpu::prefetch_code(&a.stats[c]);
                    let x = block_slices(w, h, &d, c / nb, blk + 1).0;
                    for l in (0..x.len()).step_by(16) {
                        crate::cpu::prefetch_code(&x[l]);
                    }
                }
            }
            let (p2, counts, _) = a.decide_cell(gi * nb + blk, lambda);
            let at = out.p2_codes.len();
            if p2 {
                out.p2_block.push(blk as u16);
                out.p2_codes.resize(at + b, ZERO_CODE_BYTE);
            }
            let mut s2 = [0f32; ROWS_PER_GROUP];
            for i in 0..n {
                let r = gi * ROWS_PER_GROUP + i;
                let (x, hh) = block_slices(w, h, &d, r, blk);
                let (rec, codes) = a.record(r * nb + blk);
                let (fs1, fs2) = f.fit_recorded(x, hh, rec, codes, PREDATOR_COUNTS[counts[i] as usize], if p2 { 2 } else { 1 }, cfg);
                s1[i][blk] = fs1;
                let (t1, t2) = f.codes();
                add_row_codes(&mut codes_g[blk * b..], t1, i, fs1 < 0.0);
                if p2 {
                    s2[i] = fs2;
                    add_row_codes(&mut out.p2_codes[at..], t2, i, fs2 < 0.0);
                }
                let mut pk: Vec<u8> = f.predator_positions().to_vec();
                pk.sort_unstable();
                for kk in pk {
                    out.preds[i].push(((blk * b + kk as usize) as u32, f16::from_f32(x[kk as usize])));
                }
            }
            if p2 {
                s2f.push(s2);
            }
        }
        for (i, row) in s1.iter().enumerate() {
            let m2 = s2f.iter().fold(0f32, |m, e| m.max(e[i].abs()));
            let u = row_scale_for(row.iter().fold(m2, |m, v| m.max(v.abs())));
            for (q, v) in scales_g[i * nb..(i + 1) * nb].iter_mut().zip(row) {
                *q = scale_code(v.abs(), u);
            }
            row_scales_g[i] = u;
        }
        out.p2_scales = s2f.iter().flat_map(|s2| (0..ROWS_PER_GROUP).map(|i| if i < n { scale_code(s2[i].abs(), row_scales_g[i]) } else { 0 })).collect();
        out
    }).collect();
    // 4. Assemble the arrays: offsets first, then every group copies its part in parallel.
    let mut p2_ptr = vec![0u32];
    let mut out_ptr = vec![0u32];
    for go in &groups {
        p2_ptr.push(p2_ptr[p2_ptr.len() - 1] + go.p2_block.len() as u32);
        for row in &go.preds {
            out_ptr.push(out_ptr[out_ptr.len() - 1] + row.len() as u32);
        }
    }
    let (e, m) = (p2_ptr[g] as usize, out_ptr[rows] as usize);
    let mut p2_block = vec![0u16; e];
    let mut p2_scales = vec![0u8; e * ROWS_PER_GROUP];
    let mut p2_codes = vec![0u8; e * b];
    let mut out_cols = vec![0u32; m];
    let mut out_vals = vec![f16::ZERO; m];
    let ne: Vec<usize> = groups.iter().map(|go| go.p2_block.len()).collect();
    let np: Vec<usize> = groups.iter().map(|go| go.preds.iter().map(Vec::len).sum()).collect();
    let dst = split_sizes(&mut p2_block, ne.iter().copied())
        .into_par_iter()
        .zip(split_sizes(&mut p2_scales, ne.iter().map(|n| n * ROWS_PER_GROUP)))
        .zip(split_sizes(&mut p2_codes, ne.iter().map(|n| n * b)))
        .zip(split_sizes(&mut out_cols, np.iter().copied()))
        .zip(split_sizes(&mut out_vals, np.iter().copied()));
    dst.zip(groups).for_each(|(((((pb, ps), pc), oc), ov), go)| {
        pb.copy_from_slice(&go.p2_block);
        ps.copy_from_slice(&go.p2_scales);
        pc.copy_from_slice(&go.p2_codes);
        for (k, &(c, v)) in go.preds.iter().flatten().enumerate() {
            (oc[k], ov[k]) = (c, v);
        }
    });
    let p = PackedMatrix { rows, cols, block_size: b, codes, scales, row_scales, p2_ptr, p2_block, p2_scales, p2_codes, out_ptr, out_cols, out_vals };
    debug_assert!(p.validate().is_ok());
    Ok(p)
}

/// `s` cut into consecutive pieces of the given sizes (which must add up to at most its length).
fn split_sizes<T>(mut s: &mut [T], sizes: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    sizes.map(|n| {
        let (a, rest) = std::mem::take(&mut s).split_at_mut(n);
        s = rest;
        a
    }).collect()
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
            let fit = Fitter::new().fit(&x, &h, 0, 1, &QuantConfig::new(3.0, 32));
            let (s, e) = (fit.s1, fit.err);
            let bf = brute_ternary(&x, &h);
            // Our scale is rounded to FP16 (rel. 2^-11), which can only add a tiny error.
            let tol = 1e-9 + 1e-5 * x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            assert!(e <= bf + tol && e >= bf - 1e-6 * (1.0 + bf), "trial {trial}: ours {e} brute {bf} (s={s})");
        }
    }

    /// Blocks of awkward sizes and contents: heavy tails, huge and tiny magnitudes, zeros,
    /// constants, ties, zero importance.
    fn awkward_block(rng: &mut Rng, trial: usize) -> (Vec<f32>, Vec<f32>) {
        let n = [64, 1, 2, 3, 7, 31, 32, 33, 64, 100, 128, 200, 256][trial % 13];
        let scale = [1.0f32, 1e-3, 100.0, 1e-20, 3e4][trial % 5];
        let x: Vec<f32> = (0..n).map(|i| match trial % 7 {
            0 => 0.0,
            1 => scale,
            2 => if i % 3 == 0 { -scale } else { scale * 0.5 },
            3 => (rng.normal() * 4.0).round() * scale,
            _ => { let z = rng.normal(); let c = rng.normal(); z / (0.2 + c * c).sqrt() * scale }
        }.clamp(-F16_MAX, F16_MAX)).collect();
        let h: Vec<f32> = (0..n).map(|_| match trial % 4 {
            0 => 1.0,
            1 => rng.next() as f32 * 3.0,
            2 => if rng.next() < 0.3 { 0.0 } else { (rng.normal() * 2.0).exp() },
            _ => 1e-6 + rng.next() as f32,
        }).collect();
        (x, h)
    }

    #[test]
    fn fitter_matches_the_reference() {
        let mut rng = Rng(0xD1B54A32D192ED03);
        let (mut f, mut r) = (Fitter::new(), reference::Fitter::new());
        let mut code_mismatch = 0;
        for trial in 0..3000 {
            let (x, h) = awkward_block(&mut rng, trial);
            let cfg = QuantConfig::new(3.0, 64);
            let (a, b) = (f.block_stats(&x, &h, &cfg), r.block_stats(&x, &h, &cfg));
            let tot: f64 = x.iter().zip(&h).map(|(v, w)| *w as f64 * (*v as f64).powi(2)).sum();
            // Summation order differs (lanes vs. one chain): relative 1e-6 of the block energy.
            let tol = 1e-6 * tot + 1e-30;
            for p in 0..2 {
                for ci in 0..NM {
                    let (u, v) = (a[p][ci] as f64, b[p][ci] as f64);
                    assert!(u == v || (u - v).abs() <= tol + 1e-6 * v.abs(), "trial {trial} n={} planes {} count {}: {u} vs {v}", x.len(), p + 1, PREDATOR_COUNTS[ci]);
                }
            }
            let m = PREDATOR_COUNTS[trial % NM];
            for planes in 1..=2 {
                let (p, q) = (f.fit(&x, &h, m, planes, &cfg), r.fit(&x, &h, m, planes, &cfg));
                assert!((p.err - q.err).abs() <= tol + 1e-6 * q.err, "trial {trial} m={m} planes {planes}: err {} vs {}", p.err, q.err);
                assert_eq!(p.preds, q.preds, "trial {trial}");
                // Where h = 0 a code changes nothing: ties there may go either way.
                let codes_differ = (0..x.len()).any(|k| h[k] > 0.0 && (p.t1[k], p.t2[k]) != (q.t1[k], q.t2[k]));
                if (p.s1, p.s2) != (q.s1, q.s2) || codes_differ {
                    code_mismatch += 1;
                }
            }
        }
        // Codes may differ only where two fits tie to rounding (the reference breaks exact
        // ties by how a division rounds, this fitter by position).
        assert!(code_mismatch <= 3, "{code_mismatch} fits differ in codes or scales");
    }

    #[test]
    fn simd_build_matches_the_baseline_build() {
        let mut rng = Rng(0x2545F4914F6CDD1D);
        let (mut f, mut g) = (Fitter::new(), Fitter::new());
        for trial in 0..2000 {
            let (x, h) = awkward_block(&mut rng, trial);
            let cfg = QuantConfig::new(3.0, 64);
            // Same operations in the same order (no FP contraction in Rust): equal bit for bit.
            assert_eq!(f.block_stats(&x, &h, &cfg), g.block_stats_scalar(&x, &h, &cfg), "trial {trial}");
            let m = PREDATOR_COUNTS[trial % NM];
            for planes in 1..=2 {
                let (p, q) = (f.fit_in_place(&x, &h, m, planes, &cfg), g.fit_scalar(&x, &h, m, planes, &cfg));
                assert_eq!(p, q, "trial {trial}");
                assert_eq!(f.codes(), g.codes(), "trial {trial}");
            }
        }
    }

    #[test]
    fn recorded_fits_equal_fresh_fits() {
        // Analysis keeps a record per block so encode need not refit; encoding from the record
        // must give exactly the fit a fresh `fit_in_place` gives, for every option it prices.
        let mut rng = Rng(0xA0761D6478BD642F);
        let (mut f, mut g) = (Fitter::new(), Fitter::new());
        let mut codes = vec![0u8; 128];
        for trial in 0..1500 {
            let (x, h) = awkward_block(&mut rng, trial);
            let mut cfg = QuantConfig::new(3.0, 64);
            cfg.joint_iters = [4, 0, 1, 2, 3, 6][trial % 6];
            cfg.allow_plane2 = trial % 11 != 0;
            cfg.allow_predators = trial % 13 != 0;
            let st = f.block_stats(&x, &h, &cfg);
            let rec = f.record(&mut codes);
            for (ci, &m) in PREDATOR_COUNTS.iter().enumerate() {
                for planes in 1..=2 {
                    if !st[planes - 1][ci].is_finite() {
                        continue;
                    }
                    let (s1, s2) = f.fit_recorded(&x, &h, &rec, &codes, m, planes, &cfg);
                    let (c1, c2) = (f.codes().0.to_vec(), f.codes().1.to_vec());
                    let mut pf = f.predator_positions().to_vec();
                    let (r1, r2, _) = g.fit_in_place(&x, &h, m, planes, &cfg);
                    let mut pg = g.predator_positions().to_vec();
                    pf.sort_unstable();
                    pg.sort_unstable();
                    assert_eq!((s1, s2), (r1, r2), "trial {trial} m={m} planes {planes}");
                    assert_eq!((c1.as_slice(), c2.as_slice()), g.codes(), "trial {trial} m={m} planes {planes}");
                    assert_eq!(pf, pg, "trial {trial} m={m} planes {planes}");
                }
            }
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
    #[cfg(target_arch = "x86_64")]
    fn simd_decide_matches_the_scalar_one() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = Rng(5);
        for trial in 0..20000 {
            // errors with ties (values from a small set), unavailable options (+inf) and zeros
            let stats: Vec<[[f32; NM]; 2]> = (0..1 + trial % 5).map(|_| std::array::from_fn(|_| std::array::from_fn(|_| {
                match (rng.next() * 8.0) as u32 {
                    0 => f32::INFINITY,
                    1 => 0.0,
                    2 => ((rng.next() * 4.0) as u32) as f32,
                    _ => (rng.normal() * 10.0).abs() * 10f32.powi((rng.next() * 7.0) as i32 - 3),
                }
            }))).collect();
            let refs: Vec<&[[f32; NM]; 2]> = stats.iter().collect();
            let lambda = [0.0, 1e-6, 0.01, 0.3, 1.0, 7.5, 1e3, f64::INFINITY][trial % 8];
            let (pb, eb) = ([32.0, 48.0][trial % 2], 8.0 * 71.0);
            for allow in [false, true] {
                let want = decide_impl::<false>(&refs, lambda, pb, eb, allow);
                // SAFETY: AVX2 checked above.
                let got = unsafe { decide_avx2(&refs, lambda, pb, eb, allow) };
                assert_eq!(got.0, want.0, "trial {trial}");
                assert_eq!(got.1, want.1, "trial {trial}");
                assert_eq!(got.2.to_bits(), want.2.to_bits(), "trial {trial}");
            }
        }
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
    fn price_search_finds_the_smallest_fitting_price() {
        // 16,384 cells at B = 32 (the sampled bracket, `bracket_near`) and 48 (the full one).
        let mut rng = Rng(11);
        for (n, k) in [(320, 8192), (12, 500)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.normal().powi(3)).collect();
            let a = Analysis::new(&w, n, k, None, &QuantConfig::new(3.0, 32)).unwrap();
            assert_eq!(a.bracket_near(2.5 * (n * k) as f64).is_some(), n == 320);
            for bits in [2.2, 2.5, 3.0, 3.6, 4.5] {
                let budget = bits * (n * k) as f64;
                if budget < a.min_bits() {
                    continue;
                }
                let lam = a.lambda_for_budget(budget);
                assert!(a.total_bits(lam) <= budget, "{n}x{k} at {bits}");
                // Smallest up to the search's relative width: just below it, over budget.
                assert!(a.total_bits(lam / (1.0 + 1e-6)) > budget, "{n}x{k} at {bits}: {lam} is not the smallest");
                // Skipping the cells whose bits agree at both ends changes nothing.
                let (lo, hi) = a.bracket_full(budget);
                assert_eq!(a.narrow(budget, &lo, &hi, true), a.narrow(budget, &lo, &hi, false), "{n}x{k} at {bits}");
            }
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
