//! AVX2 kernels (AVX2 + FMA + F16C), for x86-64 CPUs without AVX-512 VBMI.
//!
//! A 32-column vector (one int8 quantization chunk, inside one block for every block size) is
//! widened to 16-bit lanes once, and the digit of row i is computed exactly with two multiplies:
//! `u = lo16(b * M_i)`, `c_i = hi16(u * 3)`, `M_i = ceil(2^16 / 3^(i+1))`. (`u / 2^16` is the
//! fraction of `b / 3^(i+1)` plus at most `242 / 2^16`, less than the distance 1/243 between
//! possible fractions, so the digit boundary is never crossed; a test checks all 243 bytes.)
//! Then int8: `vpmaddwd(t, q)` per 16 columns; float32: digits to float and FMA.

#![allow(clippy::needless_range_loop)] // index loops over rows / batch vectors / lanes read best here

use super::{Activations, Ctx, Scratch, BATCH_TILE};
use crate::format::ROWS_PER_GROUP;
use core::arch::x86_64::*;

const R: usize = ROWS_PER_GROUP;

/// `ceil(2^16 / 3^(i+1))` for i = 0..5.
pub(super) const MUL: [i16; R] = [21846, 7282, 2428, 810, 270];

/// The digit formula the kernel uses, for tests: `((b * MUL[i]) mod 2^16) * 3 >> 16`.
#[cfg(test)]
pub(super) fn digit_formula(b: u8, i: usize) -> u8 {
    let u = (b as u32 * MUL[i] as u32) & 0xFFFF;
    ((u * 3) >> 16) as u8
}

/// Whether the CPU has every feature these kernels are compiled for.
pub(super) fn supported() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// `quantize_chunk` over every 32-column chunk of one padded float32 vector `xf` (scales to
/// `sx`, codes to `xq`), with the same division, round half to even and clamp, so the same
/// bytes: 8 lanes at a time instead of the scalar loop the baseline target compiles to.
///
/// # Safety
/// The CPU has AVX2 ([`supported`]); `xf.len() == xq.len() == 32 * sx.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_x(xf: &[f32], xq: &mut [i8], sx: &mut [f32]) {
    assert!(xf.len() == 32 * sx.len() && xq.len() == xf.len());
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let fmax = _mm256_set1_ps(f32::MAX);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // packs leave 4-byte groups in the order a0 b0 c0 d0 a1 b1 c1 d1: put each source's two together
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (j, s_out) in sx.iter_mut().enumerate() {
        // SAFETY: 32 j + 32 <= xf.len() = xq.len().
        unsafe {
            let v: [__m256; 4] = core::array::from_fn(|i| _mm256_loadu_ps(xf.as_ptr().add(32 * j + 8 * i)));
            let a: [__m256; 4] = core::array::from_fn(|i| _mm256_and_ps(v[i], abs_mask));
            // |v| <= MAX is false for NaN and +-Inf alike.
            let fin = (0..4).fold(0xFF, |m, i| m & _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(a[i], fmax)));
            let m8 = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps::<1>(m8));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps::<1>(m2, m2)));
            let s = if fin != 0xFF { f32::NAN } else { amax / 127.0 };
            *s_out = s;
            let out = xq.as_mut_ptr().add(32 * j) as *mut __m256i;
            if fin != 0xFF || s == 0.0 {
                _mm256_storeu_si256(out, _mm256_setzero_si256());
                continue;
            }
            let sv = _mm256_set1_ps(s);
            let q: [__m256i; 4] = core::array::from_fn(|i| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_div_ps(v[i], sv));
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
            });
            let w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256(out, _mm256_permutevar8x32_epi32(w, order));
        }
    }
}

type GroupFn = unsafe fn(&Ctx, usize, usize, &mut [f32], &mut Scratch);

fn pick<const NB: usize>(act: Activations) -> GroupFn {
    match act {
        Activations::Int8 => group::<NB, true>,
        Activations::F32 => group::<NB, false>,
    }
}

fn pick_nb(nb: usize, act: Activations) -> GroupFn {
    match nb {
        1 => pick::<1>(act),
        2 => pick::<2>(act),
        3 => pick::<3>(act),
        4 => pick::<4>(act),
        5 => pick::<5>(act),
        6 => pick::<6>(act),
        7 => pick::<7>(act),
        _ => pick::<8>(act),
    }
}

/// Computes groups `g0..` into `out` ([group][row in group][batch]).
///
/// # Safety
/// The CPU supports the features in [`supported`]; `c` satisfies the sizes documented on `Ctx`;
/// `scratch` was made by `Scratch::new(&c.d)` (`f` holds >= 5 nb floats).
pub(super) unsafe fn groups(c: &Ctx, g0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let per_group = R * c.batch;
    for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
        let mut b0 = 0;
        while b0 < c.batch {
            let nb = (c.batch - b0).min(BATCH_TILE);
            // SAFETY: forwarded from the caller; the kernel handles exactly `nb` vectors from b0.
            unsafe { pick_nb(nb, c.act)(c, g0 + gi, b0, og, scratch) };
            b0 += nb;
        }
    }
}

/// One group for batch vectors `b0..b0 + NB`.
///
/// # Safety
/// As for [`groups`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const NB: usize, const INT8: bool>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let scr = &mut scratch.f[..];
    let p = c.p;
    let stride = c.x.stride;
    let (xf, xq, sx) = c.x.tile::<NB>(b0, INT8);
    let mut acc = [[_mm256_setzero_ps(); NB]; R];

    // One 32-byte code vector against columns col..col + 32, row scales `sw`.
    let mut step = |codes: &[u8], col: usize, sw: [f32; R]| {
        debug_assert!(codes.len() >= 32 && col + 32 <= stride);
        // SAFETY: codes holds >= 32 bytes (callers pass 32-byte subslices).
        let cv = unsafe { _mm256_loadu_si256(codes.as_ptr() as *const __m256i) };
        let w = [_mm256_cvtepu8_epi16(_mm256_castsi256_si128(cv)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(cv))];
        let three = _mm256_set1_epi16(3);
        let one = _mm256_set1_epi16(1);
        // t = digit - 1 in 16-bit lanes, columns 0..16 and 16..32.
        let t: [[__m256i; 2]; R] = core::array::from_fn(|i| {
            let m = _mm256_set1_epi16(MUL[i]);
            w.map(|w| _mm256_sub_epi16(_mm256_mulhi_epu16(_mm256_mullo_epi16(w, m), three), one))
        });
        if INT8 {
            for b in 0..NB {
                let s = sx[b][col / 32];
                // SAFETY: col + 32 <= stride = xq[b].len().
                let q = unsafe {
                    [
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(xq[b].as_ptr().add(col) as *const __m128i)),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(xq[b].as_ptr().add(col + 16) as *const __m128i)),
                    ]
                };
                for i in 0..R {
                    let d = _mm256_add_epi32(_mm256_madd_epi16(t[i][0], q[0]), _mm256_madd_epi16(t[i][1], q[1]));
                    acc[i][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sw[i] * s), acc[i][b]);
                }
            }
        } else {
            // Digits as float, 4 x 8 columns per row, shared by the batch.
            let tf: [[__m256; 4]; R] = core::array::from_fn(|i| {
                let [lo, hi] = t[i];
                [
                    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(lo))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(hi))),
                ]
            });
            for b in 0..NB {
                // SAFETY: col + 32 <= stride = xf[b].len().
                let xv: [__m256; 4] = unsafe { core::array::from_fn(|q| _mm256_loadu_ps(xf[b].as_ptr().add(col + 8 * q))) };
                for i in 0..R {
                    let s = _mm256_fmadd_ps(tf[i][1], xv[1], _mm256_mul_ps(tf[i][0], xv[0]));
                    let s = _mm256_fmadd_ps(tf[i][3], xv[3], _mm256_fmadd_ps(tf[i][2], xv[2], s));
                    acc[i][b] = _mm256_fmadd_ps(s, _mm256_set1_ps(sw[i]), acc[i][b]);
                }
            }
        }
    };

    super::walk_pieces(c, g, scr, &mut step);

    for i in 0..R {
        let r = g * R + i;
        for b in 0..NB {
            let mut y = hsum(acc[i][b]);
            if r < p.rows {
                y += super::predators_f32(c, r, xf[b]);
            }
            out[i * c.batch + b0 + b] = y;
        }
    }
}

#[inline(always)]
fn hsum(v: __m256) -> f32 {
    let mut a = [0f32; 8];
    // SAFETY: `a` is 8 floats, exactly one unaligned 256-bit store (AVX is implied by the callers' AVX2).
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}
