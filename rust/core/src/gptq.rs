//! GPTQ-style error feedback inside the packed format, one block column at a time.
//!
//! The caller (Python, `predprey_rs.calibrate.gptq_quantize`) walks the block columns left to
//! right. For each one it hands over the block's current weights (already corrected by the
//! errors of the columns to its left), the block's importance, the block's slice of the upper
//! Cholesky factor `U` of the damped inverse Hessian (`H^-1 = U^T U`) and the fixed options of
//! every row (planes, predator count). [`quantize_block`] then
//!
//! 1. fits the block scales and predator positions of every row for those options
//!    ([`fit_block_rows`]), and
//! 2. rounds the block's columns one after another to the nearest of the row's levels
//!    (`s1 * u + s2 * v`, u, v in {-1, 0, 1}; predators keep their FP16 value), pushing each
//!    column's scaled error `e = (w - q) / U[j, j]` onto the columns to its right inside the block
//!    (`w[j'] -= e * U[j, j']`).
//!
//! It returns the codes, scales, predators and the scaled errors `E` [rows, len]; the caller
//! applies `W[:, right] -= E @ U[block, right]` to the later blocks (one matrix product, BLAS).
//! Every row is independent inside a block, so rows run in parallel.

use half::f16;
use rayon::prelude::*;

use crate::format::{scale_code, scale_value};
use crate::quant::{fit_block_rows, QuantConfig, QuantError};

/// The result of [`quantize_block`] for `rows` rows of a block of `len` columns (row-major).
#[derive(Clone, Debug, Default)]
pub struct GptqBlock {
    /// Plane-1 scale per row (FP16-rounded).
    pub s1: Vec<f32>,
    /// Plane-2 scale per row (0 where the row has one plane).
    pub s2: Vec<f32>,
    /// Plane-1 codes [rows, len], 0 at predators.
    pub t1: Vec<i8>,
    /// Plane-2 codes [rows, len], 0 at predators and in one-plane rows.
    pub t2: Vec<i8>,
    /// Predator values [rows, len] (FP16-representable), NaN where there is none.
    pub pred: Vec<f32>,
    /// Scaled rounding errors `(w - q) / U[j, j]` [rows, len], for the caller's update of the
    /// columns to the right of the block.
    pub err: Vec<f32>,
}

/// Quantizes one block column with error feedback (see the module docs). `w` [rows, len] is
/// updated in place (it ends as the weights each column was rounded from); `h` [len] is the
/// block's importance, `u` [len, len] the block's diagonal slice of the upper Cholesky factor
/// of the damped inverse Hessian, `planes` and `npred` [rows] the options. `units` [rows]: the
/// rows' FP16 row scales (FORMAT.md) if the fitted scales are to be rounded to their 8-bit grids
/// before the columns are (so the codes are chosen for the scales that will be stored).
#[allow(clippy::too_many_arguments)]
pub fn quantize_block(w: &mut [f32], len: usize, h: &[f32], u: &[f32], planes: &[u8], npred: &[u8], units: Option<&[f32]>, cfg: &QuantConfig) -> Result<GptqBlock, QuantError> {
    let rows = planes.len();
    check_factor(u, len)?;
    if units.is_some_and(|v| v.len() != rows) {
        return Err(QuantError::Shape(format!("gptq: units has {} values; expected one per row ({rows})", units.map_or(0, |v| v.len()))));
    }
    let fits = fit_block_rows(w, len, h, planes, npred, cfg)?;
    // A fitted scale on row r's grid: the value its 8-bit code stands for (sign kept).
    let snap = |s: f32, r: usize| match units {
        Some(us) if us[r] > 0.0 => {
            let unit = half::f16::from_f32(us[r]);
            s.signum() * scale_value(scale_code(s.abs(), unit), unit)
        }
        _ => s, // no grid given (or a zero unit: the packer picks one later)
    };
    let s1: Vec<f32> = fits.iter().enumerate().map(|(r, f)| snap(f.s1, r)).collect();
    let s2: Vec<f32> = fits.iter().zip(planes).enumerate().map(|(r, (f, &p))| if p == 2 { snap(f.s2, r) } else { 0.0 }).collect();
    let mut is_pred = vec![false; rows * len];
    for (r, f) in fits.iter().enumerate() {
        for &(k, _) in &f.preds {
            is_pred[r * len + k] = true;
        }
    }
    round_block(w, len, u, s1, s2, &is_pred)
}

/// The rounding half of [`quantize_block`] with the scales and predator positions given
/// (e.g. scales refitted after a first pass): `s1`, `s2` [rows] (s2 = 0: one plane),
/// `is_pred` [rows, len].
pub fn quantize_block_fixed(w: &mut [f32], len: usize, u: &[f32], s1: &[f32], s2: &[f32], is_pred: &[bool]) -> Result<GptqBlock, QuantError> {
    let rows = s1.len();
    check_factor(u, len)?;
    if len == 0 || w.len() != rows * len || s2.len() != rows || is_pred.len() != rows * len {
        return Err(QuantError::Shape(format!(
            "gptq: w has {} values, s1 {}, s2 {}, is_pred {}; expected [rows, len], [rows], [rows], [rows, len]",
            w.len(), s1.len(), s2.len(), is_pred.len())));
    }
    if let Some(i) = s1.iter().chain(s2).position(|v| !v.is_finite()) {
        return Err(QuantError::Value(format!("gptq: scale {i} is not finite")));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::Value(format!("gptq: w[{}, {}] = {}; expected finite values", i / len, i % len, w[i])));
    }
    round_block(w, len, u, s1.to_vec(), s2.to_vec(), is_pred)
}

fn check_factor(u: &[f32], len: usize) -> Result<(), QuantError> {
    if u.len() != len * len {
        return Err(QuantError::Shape(format!("gptq: u has {} values; expected [{len}, {len}]", u.len())));
    }
    if let Some(j) = (0..len).find(|&j| !(u[j * len + j].is_finite() && u[j * len + j] > 0.0)) {
        return Err(QuantError::Value(format!("gptq: u[{j}, {j}] = {}; expected a positive finite diagonal (Cholesky factor)", u[j * len + j])));
    }
    if let Some(i) = u.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::Value(format!("gptq: u[{}, {}] = {}; expected finite values", i / len, i % len, u[i])));
    }
    Ok(())
}

/// Rounds the columns left to right with in-block feedback (rows in parallel).
fn round_block(w: &mut [f32], len: usize, u: &[f32], s1: Vec<f32>, s2: Vec<f32>, is_pred: &[bool]) -> Result<GptqBlock, QuantError> {
    let rows = s1.len();
    let mut out = GptqBlock { s1, s2, t1: vec![0; rows * len], t2: vec![0; rows * len], pred: vec![f32::NAN; rows * len], err: vec![0.0; rows * len] };
    let (s1, s2) = (&out.s1, &out.s2);
    w.par_chunks_mut(len)
        .zip(out.t1.par_chunks_mut(len))
        .zip(out.t2.par_chunks_mut(len))
        .zip(out.pred.par_chunks_mut(len))
        .zip(out.err.par_chunks_mut(len))
        .enumerate()
        .for_each(|(r, ((((wr, t1), t2), pred), err))| {
            let ispred = &is_pred[r * len..(r + 1) * len];
            let (a, b) = (s1[r], s2[r]);
            for j in 0..len {
                let x = wr[j];
                let q = if ispred[j] {
                    let v = f16::from_f32(x).to_f32();
                    pred[j] = v;
                    v
                } else {
                    let (cu, cv) = nearest_level(x, a, b);
                    t1[j] = cu;
                    t2[j] = cv;
                    a * cu as f32 + b * cv as f32
                };
                let e = (x - q) / u[j * len + j];
                err[j] = e;
                let urow = &u[j * len + j + 1..(j + 1) * len];
                for (wv, uv) in wr[j + 1..].iter_mut().zip(urow) {
                    *wv -= e * uv;
                }
            }
        });
    Ok(out)
}

/// The codes (u, v) in {-1, 0, 1}^2 whose level `a u + b v` is nearest to `x`; with `b == 0`
/// (one plane) v is 0. Ties go to the first in the order u, then v, ascending.
pub fn nearest_level(x: f32, a: f32, b: f32) -> (i8, i8) {
    let mut best = (0i8, 0i8);
    let mut best_d = f32::INFINITY;
    let vs: &[i8] = if b == 0.0 { &[0] } else { &[-1, 0, 1] };
    for cu in [-1i8, 0, 1] {
        for &cv in vs {
            let d = (x - (a * cu as f32 + b * cv as f32)).abs();
            if d < best_d {
                best_d = d;
                best = (cu, cv);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn nearest_level_is_the_nearest_of_nine() {
        let mut s = 7u64;
        for _ in 0..2000 {
            let (x, a, b) = (lcg(&mut s) * 3.0, lcg(&mut s).abs() + 0.01, lcg(&mut s).abs() * 0.5);
            let (cu, cv) = nearest_level(x, a, b);
            let d = (x - (a * cu as f32 + b * cv as f32)).abs();
            for u in -1..=1 {
                for v in -1..=1 {
                    assert!(d <= (x - (a * u as f32 + b * v as f32)).abs());
                }
            }
        }
        assert_eq!(nearest_level(0.9, 1.0, 0.0).1, 0);
    }

    /// With U = I (no correlation between columns) there is no feedback: every weight is
    /// simply rounded to its nearest level, and the errors are the plain rounding errors.
    #[test]
    fn identity_factor_means_plain_rounding() {
        let (rows, len) = (7, 64);
        let mut s = 3u64;
        let w0: Vec<f32> = (0..rows * len).map(|_| lcg(&mut s)).collect();
        let mut w = w0.clone();
        let mut u = vec![0.0; len * len];
        for j in 0..len {
            u[j * len + j] = 1.0;
        }
        let h = vec![1.0; len];
        let planes: Vec<u8> = (0..rows).map(|r| 1 + (r % 2) as u8).collect();
        let npred: Vec<u8> = (0..rows).map(|r| (r % 3) as u8).collect();
        let cfg = QuantConfig::new(0.0, 64);
        let g = quantize_block(&mut w, len, &h, &u, &planes, &npred, None, &cfg).unwrap();
        assert_eq!(w, w0);
        for r in 0..rows {
            assert_eq!(g.pred[r * len..(r + 1) * len].iter().filter(|v| v.is_finite()).count(), npred[r] as usize);
            for j in 0..len {
                let i = r * len + j;
                let q = if g.pred[i].is_finite() { g.pred[i] } else { g.s1[r] * g.t1[i] as f32 + g.s2[r] * g.t2[i] as f32 };
                assert!((g.err[i] - (w0[i] - q)).abs() < 1e-6);
                if planes[r] == 1 {
                    assert_eq!(g.t2[i], 0);
                }
            }
        }
    }

    #[test]
    fn feedback_moves_the_later_columns() {
        let len = 32;
        let mut s = 11u64;
        let w0: Vec<f32> = (0..len).map(|_| lcg(&mut s)).collect();
        let mut w = w0.clone();
        let mut u = vec![0.0; len * len];
        for j in 0..len {
            for k in j..len {
                u[j * len + k] = if j == k { 1.0 } else { 0.3 };
            }
        }
        let g = quantize_block(&mut w, len, &[1.0; 32], &u, &[1], &[0], None, &QuantConfig::new(0.0, 32)).unwrap();
        // column j was rounded from w0[j] - sum_{i<j} e_i * 0.3
        for j in 0..len {
            let expect = w0[j] - 0.3 * g.err[..j].iter().sum::<f32>();
            assert!((w[j] - expect).abs() < 1e-5, "column {j}: {} vs {expect}", w[j]);
        }
    }

    #[test]
    fn fixed_scales_give_the_same_rounding_as_the_fitted_ones() {
        let (rows, len) = (9, 64);
        let mut s = 5u64;
        let w0: Vec<f32> = (0..rows * len).map(|_| lcg(&mut s)).collect();
        let mut u = vec![0.0; len * len];
        for j in 0..len {
            for k in j..len {
                u[j * len + k] = if j == k { 1.0 + 0.1 * lcg(&mut s).abs() } else { 0.05 * lcg(&mut s) };
            }
        }
        let planes: Vec<u8> = (0..rows).map(|r| 1 + (r % 2) as u8).collect();
        let npred: Vec<u8> = (0..rows).map(|r| (r % 4) as u8).collect();
        let cfg = QuantConfig::new(0.0, 64);
        let mut w1 = w0.clone();
        let g = quantize_block(&mut w1, len, &vec![1.0; len], &u, &planes, &npred, None, &cfg).unwrap();
        let is_pred: Vec<bool> = g.pred.iter().map(|v| v.is_finite()).collect();
        let mut w2 = w0.clone();
        let f = quantize_block_fixed(&mut w2, len, &u, &g.s1, &g.s2, &is_pred).unwrap();
        assert_eq!((&f.t1, &f.t2, &f.err), (&g.t1, &g.t2, &g.err));
        assert_eq!(w1, w2);
        assert!(quantize_block_fixed(&mut w2, len, &u, &g.s1, &g.s2[1..], &is_pred).is_err());
    }

    #[test]
    fn rejects_a_bad_factor() {
        let mut w = vec![0.5; 4];
        let cfg = QuantConfig::new(0.0, 32);
        let e = quantize_block(&mut w, 2, &[1.0; 2], &[1.0, 0.0, 0.0, 0.0], &[1, 1], &[0, 0], None, &cfg).unwrap_err();
        assert!(e.to_string().contains("u[1, 1]"), "{e}");
        let e = quantize_block(&mut w, 2, &[1.0; 2], &[1.0; 3], &[1, 1], &[0, 0], None, &cfg).unwrap_err();
        assert!(e.to_string().contains("expected [2, 2]"), "{e}");
    }
}
