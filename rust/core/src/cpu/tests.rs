//! Every fast path against the scalar reference (and the float64 dense product), on random
//! packed matrices built directly from random codes.

#![allow(clippy::needless_range_loop)] // index loops over rows / batch vectors / lanes read best here

use super::*;
use crate::format::{pack_digits, Dims, DIGITS, ZERO_CODE_BYTE};
use half::f16;

/// splitmix64: tiny, deterministic, good enough for test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f64 {
        let u = self.f64().max(1e-300);
        let v = self.f64();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// Student-t with 3 degrees of freedom (heavy tails).
    pub fn student3(&mut self) -> f64 {
        let chi2: f64 = (0..3).map(|_| self.normal().powi(2)).sum();
        self.normal() / (chi2 / 3.0).sqrt()
    }
}

/// Options for [`random_packed_with`].
#[derive(Clone, Copy)]
pub(crate) struct Opts {
    /// Scales are `scale * uniform(0.05, 1) * random sign`.
    pub scale: f32,
    /// Every plane-1 and plane-2 scale is 0.
    pub zero_scales: bool,
}

/// A random valid packed matrix: random digits everywhere (code 0 under predators, 121 in
/// padding rows and columns), plane-2 entries on a `p2_density` fraction of (group, block)
/// cells, predators on an `outlier_density` fraction of the weights. Validated.
pub(crate) fn random_packed(rows: usize, cols: usize, block: usize, p2_density: f64, outlier_density: f64, seed: u64) -> PackedMatrix {
    random_packed_with(rows, cols, block, p2_density, outlier_density, seed, Opts { scale: 1.0, zero_scales: false })
}

pub(crate) fn random_packed_with(
    rows: usize,
    cols: usize,
    block: usize,
    p2_density: f64,
    outlier_density: f64,
    seed: u64,
    o: Opts,
) -> PackedMatrix {
    let d = Dims::new(rows, cols, block).unwrap();
    let (g, kp, nb) = (d.n_groups, d.padded_cols, d.n_blocks);
    let mut rng = Rng::new(seed);
    // 8-bit scale codes (any value, 0 now and then) under a row scale near o.scale.
    let scale = |rng: &mut Rng| -> u8 {
        if o.zero_scales || rng.below(20) == 0 {
            return 0;
        }
        rng.below(256) as u8
    };
    let row_scales: Vec<f16> = (0..rows)
        .map(|_| f16::from_f32(if o.zero_scales { 0.0 } else { (o.scale * (0.5 + rng.f64() as f32)).min(65504.0) }))
        .collect();
    // Predators first: a predator position gets ternary 0 in every plane.
    let mut is_pred = vec![false; rows * cols];
    let (mut out_ptr, mut out_cols, mut out_vals) = (vec![0u32], Vec::new(), Vec::new());
    for r in 0..rows {
        for k in 0..cols {
            if rng.f64() < outlier_density {
                is_pred[r * cols + k] = true;
                out_cols.push(k as u32);
                out_vals.push(f16::from_f32(((4.0 * rng.normal() as f32) * o.scale.max(1e-3)).clamp(-65000.0, 65000.0)));
            }
        }
        out_ptr.push(out_cols.len() as u32);
    }
    let real = |r: usize, k: usize| r < rows && k < cols && !is_pred[r * cols + k];
    let byte = |rng: &mut Rng, gi: usize, k: usize| -> u8 {
        let mut c = [1u8; 5];
        for (i, ci) in c.iter_mut().enumerate() {
            if real(gi * 5 + i, k) {
                *ci = rng.below(3) as u8;
            }
        }
        pack_digits(c)
    };
    let mut codes = vec![ZERO_CODE_BYTE; g * kp];
    for gi in 0..g {
        for k in 0..kp {
            codes[gi * kp + k] = byte(&mut rng, gi, k);
        }
    }
    let scales: Vec<u8> = (0..rows * nb).map(|_| scale(&mut rng)).collect();
    let (mut p2_ptr, mut p2_block, mut p2_scales, mut p2_codes) = (vec![0u32], Vec::new(), Vec::new(), Vec::new());
    for gi in 0..g {
        for blk in 0..nb {
            if rng.f64() < p2_density {
                p2_block.push(blk as u16);
                for i in 0..5 {
                    p2_scales.push(if gi * 5 + i < rows { scale(&mut rng) } else { 0 });
                }
                for kk in 0..block {
                    p2_codes.push(byte(&mut rng, gi, blk * block + kk));
                }
            }
        }
        p2_ptr.push(p2_block.len() as u32);
    }
    let p = PackedMatrix {
        rows,
        cols,
        block_size: block,
        codes,
        scales,
        row_scales,
        p2_ptr,
        p2_block,
        p2_scales,
        p2_codes,
        out_ptr,
        out_cols,
        out_vals,
    };
    p.validate().unwrap();
    p
}

fn random_x(rng: &mut Rng, n: usize, mag: f32, heavy: bool) -> Vec<f32> {
    (0..n).map(|_| mag * if heavy { rng.student3() } else { rng.normal() } as f32).collect()
}

/// Y = X W^T from the decompressed matrix, in float64.
fn dense(p: &PackedMatrix, x: &[f32], batch: usize) -> Vec<f64> {
    let w = p.decompress();
    let (n, k) = (p.rows, p.cols);
    let mut y = vec![0f64; batch * n];
    for b in 0..batch {
        for r in 0..n {
            y[b * n + r] = (0..k).map(|c| w[r * k + c] as f64 * x[b * k + c] as f64).sum();
        }
    }
    y
}

/// sqrt(sum_rows (sum_k |W_rk x_k|)^2): the size of the terms that the kernels add up.
fn abs_norm(p: &PackedMatrix, x: &[f32], batch: usize) -> f64 {
    let w = p.decompress();
    let (n, k) = (p.rows, p.cols);
    let mut s = 0f64;
    for b in 0..batch {
        for r in 0..n {
            let a: f64 = (0..k).map(|c| (w[r * k + c] as f64 * x[b * k + c] as f64).abs()).sum();
            s += a * a;
        }
    }
    s.sqrt()
}

/// The documented int8 bound, row by row: |y8_r - y_r| <= sum_j max_j|x| / 254 * sum_{k in j} |T_rk|
/// (T = W without predators), plus float rounding (1e-5 of sum_k |W_rk x_k|).
fn check_int8_bound(p: &PackedMatrix, x: &[f32], batch: usize, y8: &[f32], want: &[f64], what: &str) {
    let (n, k) = (p.rows, p.cols);
    let mut t = p.decompress();
    for r in 0..n {
        for j in p.out_ptr[r] as usize..p.out_ptr[r + 1] as usize {
            t[r * k + p.out_cols[j] as usize] = 0.0;
        }
    }
    let w = p.decompress();
    for b in 0..batch {
        let xb = &x[b * k..(b + 1) * k];
        for r in 0..n {
            let mut bound = 0f64;
            for (j, xc) in xb.chunks(QUANT_CHUNK).enumerate() {
                let amax = xc.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let tsum: f64 = (0..xc.len()).map(|kk| t[r * k + j * QUANT_CHUNK + kk].abs() as f64).sum();
                bound += amax / 254.0 * tsum;
            }
            let mag: f64 = (0..k).map(|c| (w[r * k + c] as f64 * xb[c] as f64).abs()).sum();
            let err = (y8[b * n + r] as f64 - want[b * n + r]).abs();
            assert!(err <= bound * 1.001 + 1e-5 * mag, "int8 bound broken at row {r}, batch {b}: {err:e} > {bound:e} ({what})");
        }
    }
}

/// Norm-wise relative error ||y - want|| / ||want|| (0 when both are 0).
fn rel(y: &[f32], want: &[f64]) -> f64 {
    let num: f64 = y.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
    let den: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    if num == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn run(level: Level, p: &PackedMatrix, x: &[f32], batch: usize, act: Activations) -> Vec<f32> {
    let mut y = vec![f32::NAN; batch * p.rows];
    matmul_with(level, p, x, batch, act, &mut y).unwrap();
    y
}

fn levels() -> Vec<Level> {
    let l: Vec<Level> = Level::ALL.into_iter().filter(|l| l.supported()).collect();
    if std::env::var_os("PREDPREY_REQUIRE_AVX512").is_some() {
        assert!(l.contains(&Level::Avx512), "AVX-512 kernel required but not supported here");
    }
    l
}

/// Tolerances, with their reasons:
/// * float32 vs float64 dense: 1e-5 norm-wise, the acceptance bound (f32 accumulation over
///   K terms in 16 lanes, about 1e-7 in practice);
/// * int8 fast path vs int8 reference: 1e-5 (identical quantization and integer sums; only the
///   float32 products scale * s_j and the accumulation round);
/// * int8 vs float64 dense: 2e-2 (quantization of x per 32 columns, ~0.5 % for normal x).
const TOL_F32: f64 = 1e-5;
const TOL_INT8_SAME: f64 = 1e-5;
const TOL_INT8: f64 = 2e-2;

/// Checks every supported level, both activations, on `p` with batches `batches`.
fn check_all(p: &PackedMatrix, batches: &[usize], seed: u64, xmag: f32, heavy: bool) {
    let mut rng = Rng::new(seed);
    for &batch in batches {
        let x = random_x(&mut rng, batch * p.cols, xmag, heavy);
        let want = dense(p, &x, batch);
        let ref8 = run(Level::Scalar, p, &x, batch, Activations::Int8);
        let what = format!("{}x{} B={} batch={batch} E={} M={}", p.rows, p.cols, p.block_size, p.n_p2_entries(), p.n_outliers());
        check_int8_bound(p, &x, batch, &ref8, &want, &what);
        let e8 = rel(&ref8, &want);
        // The 2 % norm-wise figure is statistical: hold to it on normal x and >= 4096 weights.
        if !heavy && p.rows * p.cols >= 4096 {
            assert!(e8 <= TOL_INT8, "scalar int8 vs dense: {e8:.3e} ({what})");
        }
        for level in levels() {
            let y = run(level, p, &x, batch, Activations::F32);
            let e = rel(&y, &want);
            assert!(e <= TOL_F32, "{level:?} f32 vs dense: {e:.3e} ({what})");
            let y8 = run(level, p, &x, batch, Activations::Int8);
            // Relative to sum_k |W_rk x_k| (norm over rows): float32 rounding of the terms, which
            // a row whose terms cancel (a predator against the ternary part) cannot hide.
            let num: f64 = y8.iter().zip(&ref8).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
            let e = num / abs_norm(p, &x, batch).max(f64::MIN_POSITIVE);
            assert!(e <= TOL_INT8_SAME, "{level:?} int8 vs scalar int8: {e:.3e} ({what})");
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn digit_decoders_match_the_format() {
    for b in 0..=242u8 {
        for i in 0..5 {
            assert_eq!(avx2::digit_formula(b, i), DIGITS[b as usize][i], "avx2 formula, byte {b} row {i}");
            // Balanced trick: digits of b are those of |b - 121|, negated when b < 121.
            let v = b as i32 - 121;
            let t = avx512::bal_digit(v.unsigned_abs() as usize, i) as i32 - 1;
            let t = if v < 0 { -t } else { t };
            assert_eq!(t, DIGITS[b as usize][i] as i32 - 1, "balanced LUT, byte {b} row {i}");
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn avx2_int8_combinations_match_the_format() {
    if !Level::Avx2.supported() {
        return;
    }
    // SAFETY: AVX2 present (checked above).
    let all = unsafe { avx2::combos_of_all_bytes() };
    for b in 0..=255usize {
        let [lo, c0, mid, c2, c4] = all[b];
        // Every byte (also the invalid 243..=255): b = lo + 9 mid + 81 c4, and every
        // combination small enough for vpmaddubsw (<= 8, c4 <= 3).
        assert_eq!(lo as usize + 9 * mid as usize + 81 * c4 as usize, b, "byte {b}");
        assert!(lo <= 8 && mid <= 8 && c4 <= 3 && c0 == lo % 3 && c2 == mid % 3, "byte {b}: {:?}", all[b]);
        if b <= 242 {
            let d = DIGITS[b];
            assert_eq!([c0, (lo - c0) / 3, c2, (mid - c2) / 3, c4], d, "digits of byte {b}");
        }
    }
}

#[test]
#[cfg(target_arch = "aarch64")]
fn neon_digit_split_matches_the_format() {
    for b in 0..=255u8 {
        let (lo, hi) = neon::split_formula(b);
        if b <= 242 {
            assert_eq!((lo, hi), (b % 9, b / 9), "split of byte {b}");
            for i in 0..5 {
                let idx = if i < 2 { lo } else { hi } as usize;
                assert_eq!(neon::TABLES[i][idx] as i32, DIGITS[b as usize][i] as i32 - 1, "table, byte {b} row {i}");
            }
        } else {
            // Invalid bytes: `hi` past the 27 defined entries (rows 0, 1 are masked in the kernel).
            assert!((27..32).contains(&hi), "byte {b}: hi = {hi}");
            for i in 2..5 {
                assert_eq!(neon::TABLES[i][hi as usize], 0, "table, invalid byte {b} row {i}");
            }
        }
    }
}

#[test]
fn scalar_reference_matches_dense() {
    let p = random_packed(23, 200, 64, 0.6, 0.02, 1);
    let mut rng = Rng::new(2);
    let x = random_x(&mut rng, 200, 1.0, false);
    let want = dense(&p, &x, 1);
    let y = run(Level::Scalar, &p, &x, 1, Activations::F32);
    // f64 accumulation of the same values: only the f32 rounding of W and of y remain.
    assert!(rel(&y, &want) <= 1e-6, "{}", rel(&y, &want));
}

#[test]
fn awkward_shapes_every_block_size() {
    let mut seed = 10;
    for &block in &crate::format::BLOCK_SIZES {
        for &(n, k) in &[(1, 1), (1, 100), (2, 31), (5, 64), (7, 33), (11, 576), (12, 700), (3, block + 1), (6, 2 * block - 1)] {
            seed += 1;
            let p = random_packed(n, k, block, 0.6, 0.01, seed);
            check_all(&p, &[1, 2], seed, 1.0, false);
        }
    }
}

#[test]
fn plane2_and_predator_densities() {
    for (i, &(p2, out)) in [(0.0, 0.0), (1.0, 0.0), (0.0, 0.2), (1.0, 0.3), (0.6, 0.01)].iter().enumerate() {
        for &block in &[32, 64, 256] {
            let p = random_packed(17, 600, block, p2, out, 100 + i as u64);
            check_all(&p, &[1, 3], 200 + i as u64, 1.0, false);
        }
    }
}

#[test]
fn every_batch_size() {
    for &block in &[32, 128] {
        let p = random_packed(14, 450, block, 0.6, 0.01, 300);
        check_all(&p, &(1..=9).chain([16, 17]).collect::<Vec<_>>(), 301, 1.0, false);
    }
}

#[test]
fn superblock_paths() {
    // K spanning whole 512-column superblocks (AVX-512 int8 path) plus tails of every kind.
    let mut seed = 1300;
    for &block in &crate::format::BLOCK_SIZES {
        for &k in &[512, 1024 + 64, 1536 + 17, 2048 - 1] {
            for &(p2, out) in &[(0.6, 0.02), (1.0, 0.0), (0.1, 0.0)] {
                seed += 1;
                let p = random_packed(7, k, block, p2, out, seed);
                check_all(&p, &[1, 3, 8, 9], seed, 1.0, false);
            }
        }
    }
}

#[test]
fn every_tail_past_the_superblocks() {
    // K past the last whole superblock by every multiple of 32 up to 480 (1..15 chunks of 32
    // columns): the AVX2 kernel's short tails (`arrange` of 1, 2 or 4 chunk vectors) and its
    // zero-padded whole superblocks, the AVX-512 kernel's 64-column steps and half vector.
    let mut seed = 1400;
    for &block in &crate::format::BLOCK_SIZES {
        for t in 1..16 {
            seed += 1;
            let k = 512 + 32 * t - (seed as usize % 3) * 7 % block.min(32);
            let p = random_packed(6, k, block, 0.5, 0.02, seed);
            check_all(&p, &[1, 2, 5], seed, 1.0, false);
        }
    }
}

#[test]
fn larger_matrix_parallel_path() {
    // Enough work for the threaded path (n_groups * Kp >= 2^17: the team, or the pool).
    let p = random_packed(203, 2304, 64, 0.6, 0.01, 400);
    check_all(&p, &[1, 4], 401, 1.0, false);
    let p = random_packed(96, 1537, 32, 0.5, 0.01, 402);
    check_all(&p, &[1], 403, 1.0, true);
    // K >= 4096: the AVX-512 kernel adds the predators after all groups of a task (N not a
    // multiple of 5, batches that tile, single-call and parallel paths).
    let p = random_packed(53, 4500, 64, 0.6, 0.03, 404);
    check_all(&p, &[1, 3, 9], 405, 1.0, false);
}

#[test]
fn wide_k_u32_predator_columns() {
    // K > 65536: predator columns past u16 (stored as u32 in the file), K not a multiple of 64
    // or 512, N not a multiple of 5, plane 2 and predators on every kind of superblock.
    for &(block, seed) in &[(64, 1400), (32, 1401), (256, 1402)] {
        let p = random_packed(7, 70_001, block, 0.5, 0.002, seed);
        assert!(p.out_cols.iter().any(|&c| c > 65_535), "no predator column past u16");
        check_all(&p, &[1, 2], seed + 10, 1.0, false);
    }
}

#[test]
fn huge_and_tiny_magnitudes() {
    let opts = |scale| Opts { scale, zero_scales: false };
    for (j, &(scale, xmag)) in [(6.0e4f32, 1.0e15f32), (1.0e-6, 1.0e-20), (1.0e-7, 1.0e10), (3.0e4, 1.0e-12)].iter().enumerate() {
        for &block in &[32, 64] {
            let p = random_packed_with(12, 333, block, 0.6, 0.02, 500 + j as u64, opts(scale));
            check_all(&p, &[1, 2], 600 + j as u64, xmag, false);
        }
    }
}

#[test]
fn heavy_tailed_x() {
    let p = random_packed(31, 1000, 64, 0.6, 0.01, 700);
    check_all(&p, &[1, 5], 701, 1.0, true);
}

#[test]
fn zero_scales_leave_only_predators() {
    let p = random_packed_with(9, 130, 64, 0.7, 0.05, 800, Opts { scale: 1.0, zero_scales: true });
    let mut rng = Rng::new(801);
    let x = random_x(&mut rng, 130, 1.0, false);
    let want = dense(&p, &x, 1);
    for level in levels() {
        for act in [Activations::F32, Activations::Int8] {
            let y = run(level, &p, &x, 1, act);
            // Only predators remain, and those use float32 x exactly in both activations.
            assert!(rel(&y, &want) <= TOL_F32, "{level:?} {act:?}: {}", rel(&y, &want));
        }
    }
    // No predators either: exactly zero.
    let p = random_packed_with(9, 130, 64, 0.7, 0.0, 802, Opts { scale: 1.0, zero_scales: true });
    for level in levels() {
        for act in [Activations::F32, Activations::Int8] {
            assert!(run(level, &p, &x, 1, act).iter().all(|&v| v == 0.0), "{level:?} {act:?}");
        }
    }
}

#[test]
fn zero_and_constant_x() {
    let p = random_packed(16, 257, 64, 0.6, 0.02, 900);
    for level in levels() {
        for act in [Activations::F32, Activations::Int8] {
            assert!(run(level, &p, &vec![0.0; 257], 1, act).iter().all(|&v| v == 0.0), "{level:?} {act:?}");
            let x = vec![0.75f32; 257];
            let want = dense(&p, &x, 1);
            // A constant chunk quantizes exactly (q = 127 everywhere), so int8 is exact too.
            assert!(rel(&run(level, &p, &x, 1, act), &want) <= TOL_F32, "{level:?} {act:?}");
        }
    }
}

#[test]
fn non_finite_x_shows_in_y() {
    let p = random_packed(10, 100, 32, 0.6, 0.0, 950);
    let mut x = vec![1.0f32; 100];
    x[40] = f32::NAN;
    for level in levels() {
        let y = run(level, &p, &x, 1, Activations::Int8);
        assert!(y.iter().all(|v| v.is_nan()), "{level:?}: NaN in x must poison the int8 result");
    }
}

#[test]
fn quantize_chunk_rule() {
    let mut q = [0i8; 32];
    let mut x = [0f32; 32];
    assert_eq!(quantize_chunk(&x, &mut q), 0.0);
    assert!(q.iter().all(|&v| v == 0));
    x[0] = -2.54;
    x[1] = 1.27;
    x[2] = 0.01; // 0.01 / 0.02 = 0.5 -> rounds half to even -> 0
    x[3] = 0.03; // 1.5 -> 2
    let s = quantize_chunk(&x, &mut q);
    assert!((s - 0.02).abs() < 1e-7);
    assert_eq!(&q[..4], &[-127, 64, 0, 2]);
    for (v, qq) in x.iter().zip(q) {
        assert!((v - s * qq as f32).abs() <= s / 2.0 * 1.0001, "{v} {qq}");
    }
    x[5] = f32::INFINITY;
    assert!(quantize_chunk(&x, &mut q).is_nan());
}

/// The AVX2 and AVX-512 preparations of int8 activations write exactly what the scalar rule
/// gives (`quantize_chunk` per 32 columns), and AVX-512 the superblock layout its doc comments
/// define: on random vectors of awkward lengths and magnitudes, chunks of exact ties (scale a
/// power of two, values at n + 1/2 steps), all-zero chunks and chunks with NaN or +-Inf.
#[test]
fn simd_int8_prep_matches_the_scalar_rule() {
    if levels().contains(&Level::Avx2) {
        check_int8_prep(Level::Avx2);
    }
    if levels().contains(&Level::Avx512) {
        check_int8_prep(Level::Avx512);
    }
}

fn check_int8_prep(level: Level) {
    let mut rng = Rng::new(41);
    for trial in 0..300 {
        let k = [1, 31, 32, 33, 511, 512, 513, 800, 1000, 1024, 1536, 4097, 5000][trial % 13];
        let block = [32, 64, 128, 256][trial % 4];
        let batch = 1 + trial % 3;
        let d = Dims::new(3, k, block).unwrap();
        let mag = [1e-30f32, 1e-3, 1.0, 1e4, 1e30][trial % 5];
        let mut x = random_x(&mut rng, batch * k, mag, trial % 2 == 0);
        for c in 0..(batch * k).div_ceil(32) {
            let chunk = &mut x[32 * c..(32 * c + 32).min(batch * k)];
            match rng.below(8) {
                0 => chunk.fill(0.0),
                1 => {
                    // scale 2^e exactly: the largest |v| is 127 * 2^e, the others on half steps
                    let e = rng.below(20) as i32 - 10;
                    for v in chunk.iter_mut() {
                        *v = (rng.below(255) as f32 - 127.0 + if rng.below(2) == 0 { 0.5 } else { 0.0 }).clamp(-127.0, 127.0) * 2f32.powi(e);
                    }
                    chunk[0] = 127.0 * 2f32.powi(e);
                }
                2 => chunk[rng.below(chunk.len())] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.below(3)],
                _ => {}
            }
        }
        let fast = Prep::new(&x, batch, &d, Activations::Int8, level);
        let slow = Prep::new(&x, batch, &d, Activations::Int8, Level::Scalar);
        let (st, nc) = (fast.stride, fast.stride / 32);
        assert_eq!(st, slow.stride);
        assert_eq!(fast.xq, slow.xq, "trial {trial}: codes");
        let bits = |v: &[f32]| v.iter().map(|s| if s.is_nan() { u32::MAX } else { s.to_bits() }).collect::<Vec<_>>();
        assert_eq!(bits(&fast.sx), bits(&slow.sx), "trial {trial}: scales");
        let qsum: Vec<i32> = slow.xq.chunks_exact(32).map(|c| c.iter().map(|&v| v as i32).sum()).collect();
        if level == Level::Avx2 {
            // The 256-column superblocks of the AVX2 int8 kernel.
            let t = fast.st256;
            assert!(t.is_multiple_of(256) && t >= d.padded_cols && t < d.padded_cols + 256, "trial {trial}: st256 {t}");
            let nk = d.padded_cols / 32;
            for b in 0..batch {
                for j in 0..t / 32 {
                    let inside = j < nk;
                    assert_eq!(fast.qsum256[b * (t / 32) + j], if inside { qsum[b * nc + j] } else { 0 }, "trial {trial}: chunk sums");
                    assert_eq!(bits(&fast.sx256[b * (t / 32) + j..][..1])[0], if inside { bits(&slow.sx[b * nc + j..][..1])[0] } else { 0 }, "trial {trial}: chunk scales");
                }
                for sb in 0..t / 256 {
                    // Whole superblocks transposed (V = 8), a short tail arranged (V = 1, 2, 4):
                    // vector v, lane l holds dword v P + l % P of chunk l / P, P = 8 / V.
                    #[cfg(target_arch = "x86_64")]
                    let short = avx2::tail_vectors(d.padded_cols);
                    #[cfg(not(target_arch = "x86_64"))]
                    let short = 8; // (no AVX2 level here: this block does not run)
                    let nv = if 256 * (sb + 1) > d.padded_cols && short < 8 { short } else { 8 };
                    let per = 8 / nv;
                    for v in 0..nv {
                        for l in 0..8 {
                            for j in 0..4 {
                                let col = 256 * sb + 32 * (l / per) + 4 * (v * per + l % per) + j;
                                let want = if col < d.padded_cols { slow.xq[b * st + col] } else { 0 };
                                assert_eq!(fast.xt256[b * t + 256 * sb + 32 * v + 4 * l + j], want, "trial {trial}: layout");
                            }
                        }
                    }
                }
            }
        }
        if level != Level::Avx512 {
            // Only the AVX-512 kernel reads the negated codes and lane scales.
            assert!(fast.nxq.is_empty() && fast.sxl.is_empty());
            continue;
        }
        assert_eq!(fast.nxq, slow.xq.iter().map(|&q| -q).collect::<Vec<i8>>());
        assert_eq!(bits(&fast.sxl), bits(&slow.sx.iter().flat_map(|&s| [s; QUANT_CHUNK / 4]).collect::<Vec<f32>>()));
        assert_eq!(fast.qsum, qsum, "trial {trial}: chunk sums");
        let n_sb = int8_superblocks(d.padded_cols);
        for b in 0..batch {
            for sb in 0..st / 512 {
                for l in 0..16 {
                    let (c, t) = (b * nc + 16 * sb + lane_chunk(l), b * nc + 16 * sb + l);
                    let inside = sb < n_sb;
                    assert_eq!(fast.sxt[t].to_bits(), if inside { fast.sx[c].to_bits() } else { 0 }, "trial {trial}");
                    assert_eq!(fast.qsumt[t], if inside { qsum[c] } else { 0 }, "trial {trial}");
                    for v in 0..8 {
                        for j in 0..4 {
                            let want = if inside { slow.xq[b * st + 512 * sb + 32 * lane_chunk(l) + 4 * v + j] } else { 0 };
                            assert_eq!(fast.xt[b * st + 512 * sb + 64 * v + 4 * l + j], want, "trial {trial}: layout");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn shape_errors_before_work() {
    let p = random_packed(6, 40, 32, 0.5, 0.0, 1000);
    let mut y = vec![7.0f32; 6];
    assert!(matvec(&p, &[0.0; 39], Activations::F32, &mut y).is_err());
    assert!(matvec(&p, &[0.0; 40], Activations::F32, &mut [0.0; 5]).is_err());
    assert!(matmul(&p, &[0.0; 80], 3, Activations::Int8, &mut [0.0; 18]).is_err());
    assert!(matmul(&p, &[0.0; 80], usize::MAX, Activations::Int8, &mut y).is_err());
    assert_eq!(y, vec![7.0; 6], "y untouched on error");
    assert!(matmul(&p, &[], 0, Activations::F32, &mut []).is_ok());
    let mut bad = p.clone();
    bad.codes.pop();
    let err = matvec(&bad, &[0.0; 40], Activations::F32, &mut y).unwrap_err();
    assert!(err.to_string().contains("codes"), "{err}");
    let mut bad = p.clone();
    bad.block_size = 0;
    assert!(matvec(&bad, &[0.0; 40], Activations::F32, &mut y).is_err());
}

#[test]
fn invalid_matrices_never_panic() {
    // Structure that `validate` rejects but the length checks pass: the kernels clamp.
    let p = random_packed(12, 100, 32, 0.6, 0.05, 1100);
    let x = vec![1.0f32; 100];
    let mut y = vec![0f32; 12];
    let mut bads = Vec::new();
    let mut b = p.clone();
    b.p2_ptr[1] = u32::MAX;
    bads.push(b);
    let mut b = p.clone();
    b.p2_ptr.reverse();
    bads.push(b);
    let mut b = p.clone();
    b.p2_block.iter_mut().for_each(|v| *v = u16::MAX);
    bads.push(b);
    let mut b = p.clone();
    b.out_cols.iter_mut().for_each(|v| *v = u32::MAX);
    bads.push(b);
    let mut b = p.clone();
    b.out_ptr.iter_mut().for_each(|v| *v = u32::MAX);
    bads.push(b);
    let mut b = p.clone();
    b.codes.iter_mut().for_each(|v| *v = 255);
    bads.push(b);
    for b in &bads {
        for level in levels() {
            for act in [Activations::F32, Activations::Int8] {
                matmul_with(level, b, &x, 1, act, &mut y).unwrap();
            }
        }
    }
}

/// Random corruptions of whole files (1-4 bytes set to random values, or a truncation): the
/// reader returns an error or a matrix that passed validation, and every kernel then runs on
/// that matrix without a panic (and, under `-Zsanitizer=address` or Miri, without an
/// out-of-bounds access or undefined behaviour: tests/asan.sh, tests/miri.sh).
#[test]
fn corrupted_files_load_or_fail_cleanly() {
    let mut rng = Rng::new(1300);
    let (mut loaded, mut rejected) = (0, 0);
    for (i, &(rows, cols, block)) in [(7, 100, 32), (11, 600, 64), (5, 300, 128), (3, 520, 256)].iter().enumerate() {
        let p = random_packed(rows, cols, block, 0.5, 0.03, 1310 + i as u64);
        let bytes = p.to_safetensors_bytes().unwrap();
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.normal() as f32).collect();
        let mut y = vec![0f32; 3 * rows];
        // (Under Miri, tests/miri.sh, which interprets every step: fewer.)
        for _ in 0..if cfg!(miri) { 10 } else { 1000 } {
            let mut b = bytes.clone();
            if rng.below(8) == 0 {
                b.truncate(rng.below(b.len()));
            } else {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    b[at] = rng.below(256) as u8;
                }
            }
            match PackedMatrix::from_safetensors_bytes(&b) {
                Err(_) => rejected += 1,
                Ok(m) => {
                    loaded += 1;
                    m.validate().expect("a loaded matrix is valid");
                    for level in levels() {
                        for act in [Activations::F32, Activations::Int8] {
                            matmul_with(level, &m, &x[..m.cols], 1, act, &mut y[..m.rows]).unwrap();
                            if m.cols * 3 <= x.len() && m.rows * 3 <= y.len() {
                                matmul_with(level, &m, &x[..3 * m.cols], 3, act, &mut y[..3 * m.rows]).unwrap();
                            }
                        }
                    }
                }
            }
        }
    }
    // Both outcomes occur (a byte inside code, scale or value data often leaves a valid matrix).
    let total = loaded + rejected;
    assert!(loaded * 40 > total && rejected * 2 > total, "loaded {loaded}, rejected {rejected}");
}

#[test]
fn public_entry_points_agree() {
    let p = random_packed(21, 300, 64, 0.6, 0.01, 1200);
    let mut rng = Rng::new(1201);
    let x = random_x(&mut rng, 3 * 300, 1.0, false);
    for act in [Activations::F32, Activations::Int8] {
        let mut y = vec![0f32; 3 * 21];
        matmul(&p, &x, 3, act, &mut y).unwrap();
        assert_eq!(y, run(Level::detect(), &p, &x, 3, act));
        let mut y1 = vec![0f32; 21];
        matvec(&p, &x[300..600], act, &mut y1).unwrap();
        assert_eq!(y1, run(Level::detect(), &p, &x[300..600], 1, act));
    }
    assert_eq!(kernel_name(), Level::detect().name());
    // The cross tests (tests/cross_aarch64.sh) say which kernel the emulated CPU must get.
    if let Ok(want) = std::env::var("PREDPREY_EXPECT_KERNEL") {
        assert_eq!(kernel_name(), want, "kernel picked for this CPU");
    }
}

#[test]
fn thread_pool() {
    set_num_threads(1).unwrap();
    assert_eq!(num_threads(), 1);
    assert_eq!(run_in_pool(rayon::current_num_threads), 1);
    set_num_threads(0).unwrap();
    assert_eq!(num_threads(), std::thread::available_parallelism().unwrap().get());
    assert!(set_num_threads(1 << 20).is_err());
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
extern "C" {
    fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
}
/// CPU time of the calling thread (Linux CLOCK_THREAD_CPUTIME_ID), robust to other load.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn thread_cpu() -> f64 {
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; clock 3 is CLOCK_THREAD_CPUTIME_ID on Linux.
    unsafe { clock_gettime(3, &mut t) };
    t.sec as f64 + t.nsec as f64 * 1e-9
}

/// Development timing (not a test of speed; run with `--ignored --nocapture`): one thread,
/// all groups in the calling thread, thread CPU time (so other load on the machine matters less).
#[test]
#[ignore]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn timing_print() {
    let shapes: Vec<(usize, usize)> = std::env::var("PP_SHAPES").ok().map(|s| {
        s.split(',').map(|t| { let mut it = t.split('x').map(|v| v.parse().unwrap()); (it.next().unwrap(), it.next().unwrap()) }).collect()
    }).unwrap_or(vec![(4096, 14336), (14336, 4096)]);
    let batches: Vec<usize> = std::env::var("PP_BATCH").ok().map(|s| s.split(',').map(|v| v.parse().unwrap()).collect()).unwrap_or(vec![1]);
    let block: usize = std::env::var("PP_BLOCK").ok().map(|s| s.parse().unwrap()).unwrap_or(64);
    for (n, k) in shapes {
        let dens: Vec<f64> = std::env::var("PP_DENS").ok().map(|s| s.split(',').map(|v| v.parse().unwrap()).collect()).unwrap_or(vec![0.6, 0.01]);
        // PP_DIR: read `{dir}/{n}x{k}.safetensors` (e.g. saved from `pp.compress`) instead.
        let p = match std::env::var("PP_DIR") {
            Ok(dir) => PackedMatrix::load(std::path::Path::new(&format!("{dir}/{n}x{k}.safetensors"))).unwrap(),
            Err(_) => random_packed(n, k, block, dens[0], dens[1], 7),
        };
        let mut rng = Rng::new(8);
        let d = p.dims();
        let mut tsum: Vec<f64> = (0..10).map(|_| { let t = thread_cpu(); let s: u64 = p.codes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).fold(0, |a, v| a ^ v); std::hint::black_box(s); thread_cpu() - t }).collect();
        tsum.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{n}x{k}: streaming read of codes ({} MB): {:.3} ms, {:.1} GB/s", p.codes.len() >> 20, tsum[5] * 1e3, p.codes.len() as f64 / tsum[5] / 1e9);
        for &batch in &batches {
            let x = random_x(&mut rng, batch * k, 1.0, false);
            for level in levels() {
                if level == Level::Scalar || std::env::var("PP_LEVEL").is_ok_and(|v| v != level.name()) { continue; }
                for act in [Activations::Int8, Activations::F32] {
                    if std::env::var("PP_ACT").is_ok_and(|v| v != format!("{act:?}")) { continue; }
                    let mut tpr: Vec<f64> = (0..10).map(|_| { let t = thread_cpu(); std::hint::black_box(Prep::new(&x, batch, &d, act, level)); thread_cpu() - t }).collect();
                    tpr.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    println!("  {level:?} {act:?} Prep::new: {:.3} ms", tpr[5] * 1e3);
                    let prep = Prep::new(&x, batch, &d, act, level);
                    let ctx = Ctx { p: &p, d, act, batch, x: &prep };
                    let mut out = vec![0f32; d.n_groups * 5 * batch];
                    let mut scratch = Scratch::new(&d);
                    let mut once = || match level {
                        // SAFETY: level is supported (levels()), ctx built as in matmul_with.
                        Level::Avx512 => unsafe { avx512::groups(&ctx, 0, &mut out, &mut scratch) },
                        // SAFETY: as above.
                        Level::Avx2 => unsafe { avx2::groups(&ctx, 0, &mut out, &mut scratch) },
                        // (the NEON levels are never supported on x86-64)
                        Level::Scalar | Level::Neon | Level::NeonDot => scalar::groups(&ctx, 0, &mut out),
                    };
                    if level == Level::Avx512 {
                        let mut tp: Vec<f64> = (0..10).map(|_| {
                            let t = thread_cpu();
                            let mut acc = 0f32;
                            for r in 0..n {
                                // SAFETY: AVX-512 supported (levels()); xf has stride floats.
                                acc += unsafe { avx512::predators(&ctx, r, prep.xf.as_ptr()) };
                            }
                            std::hint::black_box(acc);
                            thread_cpu() - t
                        }).collect();
                        tp.sort_by(|a, b| a.partial_cmp(b).unwrap());
                        println!("  predators alone: {:.3} ms ({} predators, {:.2} ns each)", tp[5] * 1e3, p.n_outliers(), tp[5] * 1e9 / p.n_outliers().max(1) as f64);
                    }
                    once();
                    let reps: usize = std::env::var("PP_REPS").ok().map_or(15, |v| v.parse().unwrap());
                    let mut ts: Vec<f64> = (0..reps).map(|_| { let t = thread_cpu(); once(); thread_cpu() - t }).collect();
                    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
                    println!("{n}x{k} B={block} batch={batch} {level:?} {act:?}: cpu median {:.3} ms  min {:.3} ms  ({:.2} ns/weight/vector)", ts[reps / 2] * 1e3, ts[0] * 1e3, ts[reps / 2] * 1e9 / (n * k * batch) as f64);
                }
            }
        }
    }
}
