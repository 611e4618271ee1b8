//! AVX2 kernels (AVX2 + FMA + F16C), for x86-64 CPUs without AVX-512 VBMI.
//!
//! float32: a 32-column vector (inside one block for every block size) is widened to 16-bit
//! lanes once, and the digit of row i is computed exactly with two multiplies:
//! `u = lo16(b * M_i)`, `c_i = hi16(u * 3)`, `M_i = ceil(2^16 / 3^(i+1))`. (`u / 2^16` is the
//! fraction of `b / 3^(i+1)` plus at most `242 / 2^16`, less than the distance 1/243 between
//! possible fractions, so the digit boundary is never crossed; a test checks all 243 bytes.)
//! Then digits to float and FMA.
//!
//! int8 ([`group_int8`]): 256-column superblocks of 8 transposed code vectors against `x` in the
//! same layout, five byte combinations of the digits per vector (`combos`) into `vpmaddubsw`,
//! one float step per row per superblock (docs/kernels.md). A last, partial superblock of 1..4
//! chunks is `arrange`d into 1, 2 or 4 vectors instead of padded to 8 (`Tail`).

#![allow(clippy::needless_range_loop)] // index loops over rows / batch vectors / lanes read best here

use super::{prefetch_code, Activations, Ctx, Scratch, AHEAD, BATCH_TILE};
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

/// `combos` of every byte, for tests: `out[b] = [lo, c0, mid, c2, c4]` of byte `b`.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(test)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn combos_of_all_bytes() -> Vec<[u8; R]> {
    let mut out = vec![[0u8; R]; 256];
    for v in 0..8 {
        let bytes: [u8; 32] = core::array::from_fn(|i| (32 * v + i) as u8);
        // SAFETY: 32-byte loads and stores of local arrays.
        let k = combos(unsafe { _mm256_loadu_si256(bytes.as_ptr() as *const __m256i) });
        for (m, km) in k.iter().enumerate() {
            let mut o = [0u8; 32];
            unsafe { _mm256_storeu_si256(o.as_mut_ptr() as *mut __m256i, *km) };
            for i in 0..32 {
                out[32 * v + i][m] = o[i];
            }
        }
    }
    out
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
        Activations::Int8 => group_int8::<NB>,
        Activations::F32 => group::<NB>,
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

/// One group for batch vectors `b0..b0 + NB`, float32 activations (int8: [`group_int8`]).
///
/// # Safety
/// As for [`groups`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const NB: usize>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let scr = &mut scratch.f[..];
    let p = c.p;
    let stride = c.x.stride;
    let (xf, _, _) = c.x.tile::<NB>(b0, false);
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
    };

    super::walk_pieces(c, g, scr, &mut step);

    let has_preds = !p.out_vals.is_empty();
    for i in 0..R {
        let r = g * R + i;
        for b in 0..NB {
            let mut y = hsum(acc[i][b]);
            if r < p.rows && has_preds {
                // SAFETY: features per this function's contract.
                y += unsafe { predators(c, r, xf[b]) };
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

/// The int8 layout of one batch vector for [`group_int8`] (see `Prep::xt256`): from the
/// quantized codes `xq` and chunk scales `sx` of `quantize_x`, the 256-column superblocks
/// `xt` (`transpose8` of each superblock's 8 chunks, zero past `kp`), the chunk sums `qsum`
/// and a copy of the scales `sxo` (both zero past `kp`).
///
/// # Safety
/// The CPU has AVX2 ([`supported`]); `xt.len() == 256 n`, `qsum.len() == sxo.len() == 8 n`,
/// `kp` a multiple of 32 with `kp <= xt.len()`, `kp <= xq.len()`, `kp / 32 <= sx.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn prep_int8(xq: &[i8], sx: &[f32], xt: &mut [i8], qsum: &mut [i32], sxo: &mut [f32], kp: usize) {
    let n_sb = xt.len() / 256;
    assert!(xt.len() == 256 * n_sb && qsum.len() == 8 * n_sb && sxo.len() == 8 * n_sb);
    assert!(kp.is_multiple_of(32) && kp <= xt.len() && kp <= xq.len() && kp / 32 <= sx.len());
    let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
    for j in 0..kp / 32 {
        // SAFETY: 32 j + 32 <= kp <= xq.len().
        let v = unsafe { _mm256_loadu_si256(xq.as_ptr().add(32 * j) as *const __m256i) };
        qsum[j] = hsum_i32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
        sxo[j] = sx[j];
    }
    qsum[kp / 32..].fill(0);
    sxo[kp / 32..].fill(0.0);
    for sb in 0..n_sb {
        // SAFETY: chunk loads only below kp <= xq.len(); stores at 256 sb + 32 v + 32 <= xt.len().
        unsafe {
            let rows: [__m256i; 8] = core::array::from_fn(|l| {
                let c = 256 * sb + 32 * l;
                if c + 32 <= kp { _mm256_loadu_si256(xq.as_ptr().add(c) as *const __m256i) } else { _mm256_setzero_si256() }
            });
            let out = xt.as_mut_ptr().add(256 * sb) as *mut __m256i;
            let store = |vs: &[__m256i]| {
                for (v, t) in vs.iter().enumerate() {
                    _mm256_storeu_si256(out.add(v), *t);
                }
            };
            // The last, partial superblock of a short tail in the `arrange` layout instead.
            match if sb + 1 == n_sb && 256 * sb < kp { tail_vectors(kp) } else { 8 } {
                1 => store(&arrange::<1>([rows[0]])),
                2 => store(&arrange::<2>([rows[0], rows[1]])),
                4 => store(&arrange::<4>([rows[0], rows[1], rows[2], rows[3]])),
                _ => store(&transpose8(rows)),
            }
        }
    }
}

/// Sum of the 8 int32 lanes.
#[inline(always)]
fn hsum_i32(v: __m256i) -> i32 {
    let mut a = [0i32; 8];
    // SAFETY: `a` is 8 i32, one unaligned 256-bit store (AVX2 implied by the callers).
    unsafe { _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, v) };
    a.iter().fold(0i32, |s, &x| s.wrapping_add(x))
}

/// Transposes 8 x 8 dwords: output `w`, dword `L` = input `L`, dword `w` (two stages of
/// in-lane unpacks and one of 128-bit permutes, 24 shuffles).
#[inline(always)]
fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: AVX2 is implied by the callers.
    unsafe {
        let t: [__m256i; 8] = core::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 { _mm256_unpacklo_epi32(a, b) } else { _mm256_unpackhi_epi32(a, b) }
        });
        // u[4h + k]: rows 4h..4h+4, dwords k and k + 4 (halves).
        let u: [__m256i; 8] = core::array::from_fn(|i| {
            let (h, k) = (i / 4, i % 4);
            let (a, b) = (t[4 * h + (k / 2)], t[4 * h + 2 + (k / 2)]);
            if k % 2 == 0 { _mm256_unpacklo_epi64(a, b) } else { _mm256_unpackhi_epi64(a, b) }
        });
        core::array::from_fn(|w| {
            let k = w % 4;
            if w < 4 { _mm256_permute2x128_si256::<0x20>(u[k], u[4 + k]) } else { _mm256_permute2x128_si256::<0x31>(u[k], u[4 + k]) }
        })
    }
}

/// Chunk vectors in the last, partial 256-column superblock: 0 when `kp` is a multiple of 256,
/// else `V` = 1, 2 or 4 for a tail of 1, 2 or 3..4 chunks (`arrange::<V>` of that many chunk
/// vectors, zero-padded), 8 for 5..7 (a whole transposed superblock, zero-padded). A tail of
/// 2 chunks (K = 576: SmolLM2) then costs 2 vectors' work instead of 8.
pub(super) const fn tail_vectors(kp: usize) -> usize {
    match (kp % 256) / 32 {
        0 => 0,
        1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => 8,
    }
}

/// `V` (1, 2 or 4) chunk vectors of 32 bytes rearranged into `V` vectors whose lane `L` always
/// holds 4 bytes of chunk `L / (8 / V)` (2 and 4: the 128-bit halves / qwords transposed), so
/// integer sums over the `V` vectors stay per chunk, like `transpose8` for 8: vector `u`, lane
/// `L` holds dword `u P + L % P` of chunk `L / P`, `P = 8 / V` (for `V = 8` that is
/// `transpose8`'s dword `u` of chunk `L`). Codes and `x` go through the same arrangement.
#[inline(always)]
fn arrange<const V: usize>(r: [__m256i; V]) -> [__m256i; V] {
    let mut out = r;
    // SAFETY: AVX2 is implied by the callers. (Straight-line code, no closures: a closure
    // around these intrinsics was not always inlined, and the intrinsics then became calls.)
    unsafe {
        if V == 2 {
            // out u = (half u of chunk 0, half u of chunk 1)
            out[0] = _mm256_permute2x128_si256::<0x20>(r[0], r[1 % V]);
            out[1 % V] = _mm256_permute2x128_si256::<0x31>(r[0], r[1 % V]);
        } else if V == 4 {
            // out u = qword u of chunks 0..4
            let (lo01, hi01) = (_mm256_unpacklo_epi64(r[0], r[1 % V]), _mm256_unpackhi_epi64(r[0], r[1 % V]));
            let (lo23, hi23) = (_mm256_unpacklo_epi64(r[2 % V], r[3 % V]), _mm256_unpackhi_epi64(r[2 % V], r[3 % V]));
            out[0] = _mm256_permute2x128_si256::<0x20>(lo01, lo23);
            out[1 % V] = _mm256_permute2x128_si256::<0x20>(hi01, hi23);
            out[2 % V] = _mm256_permute2x128_si256::<0x31>(lo01, lo23);
            out[3 % V] = _mm256_permute2x128_si256::<0x31>(hi01, hi23);
        }
    }
    out
}

/// The five combinations of the digits of 32 code bytes `b` that `group_int8` multiplies with
/// x: `[lo, c0, mid, c2, c4]`, with `b = lo + 9 (mid + 9 c4)`, `lo = c0 + 3 c1`,
/// `mid = c2 + 3 c3`. `b / 9` and `(b / 9) / 9` as `(v * 57) >> 9` in 16-bit lanes (exact for
/// every byte; a test checks all 256; 18 % faster than a multiply-high by `ceil(2^16 / 9)`,
/// which LLVM widens to 32 bits for byte-range inputs), `c0` and `c2` from `lo` and `mid`
/// (0..8) by one table lookup each.
/// Every combination is <= 8, so `vpmaddubsw` pairs (<= 2 * 8 * 127) never saturate.
#[inline(always)]
fn combos(b: __m256i) -> [__m256i; R] {
    // SAFETY: AVX2 is implied by the callers.
    unsafe {
        let k57 = _mm256_set1_epi16(57);
        let div9 = |v: __m256i| _mm256_srli_epi16::<9>(_mm256_mullo_epi16(v, k57));
        let even = _mm256_and_si256(b, _mm256_set1_epi16(0xFF));
        let odd = _mm256_srli_epi16::<8>(b);
        let (he, ho) = (div9(even), div9(odd));
        let hi = _mm256_or_si256(he, _mm256_slli_epi16::<8>(ho));
        let c4 = _mm256_or_si256(div9(he), _mm256_slli_epi16::<8>(div9(ho)));
        // x - 9 y bytewise; 8 y <= 8 * 28 stays inside each byte, so a 16-bit shift does.
        let lo = _mm256_sub_epi8(_mm256_sub_epi8(b, hi), _mm256_slli_epi16::<3>(hi));
        let mid = _mm256_sub_epi8(_mm256_sub_epi8(hi, c4), _mm256_slli_epi16::<3>(c4));
        let mod3 = _mm256_setr_epi8(0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0);
        [lo, _mm256_shuffle_epi8(mod3, lo), mid, _mm256_shuffle_epi8(mod3, mid), c4]
    }
}

/// One 256-column (pseudo-)superblock: `t` the 8 transposed code vectors, `xv[b][v]` the
/// activations in the same layout, `q[b]` / `s[b]` the chunk sums / scales per lane, `w[i]`
/// row i's block scale per lane. Integer sums over the superblock (16-bit, at most 8 * 2032),
/// then per row and lane `acc += (S_i - q) * w_i * s`, where `S_i = sum c_i x`: from the
/// combinations `S1 = (S(lo) - S0) / 3`, `S3 = (S(mid) - S2) / 3` exactly in int32 (the
/// inverse of 3 modulo 2^32), and `sum t x = sum c x - sum x` (t = c - 1).
#[inline(always)]
fn superblock<const NB: usize, const V: usize>(t: &[__m256i; V], xv: &[[__m256i; V]; NB], q: &[__m256i; NB], s: &[__m256; NB], w: &[__m256; R], acc: &mut [[__m256; NB]; R]) {
    // SAFETY: AVX2 + FMA are implied by the callers.
    unsafe {
        let mut a16 = [[_mm256_setzero_si256(); R]; NB];
        for v in 0..V {
            let k = combos(t[v]);
            for b in 0..NB {
                for m in 0..R {
                    a16[b][m] = _mm256_add_epi16(a16[b][m], _mm256_maddubs_epi16(k[m], xv[b][v]));
                }
            }
        }
        let ones = _mm256_set1_epi16(1);
        let inv3 = _mm256_set1_epi32(0xAAAA_AAABu32 as i32);
        for b in 0..NB {
            let a: [__m256i; R] = core::array::from_fn(|m| _mm256_madd_epi16(a16[b][m], ones));
            let sums = [
                a[1],
                _mm256_mullo_epi32(_mm256_sub_epi32(a[0], a[1]), inv3),
                a[3],
                _mm256_mullo_epi32(_mm256_sub_epi32(a[2], a[3]), inv3),
                a[4],
            ];
            for i in 0..R {
                let ts = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[i], q[b]));
                acc[i][b] = _mm256_fmadd_ps(ts, _mm256_mul_ps(w[i], s[b]), acc[i][b]);
            }
        }
    }
}

/// The last, partial superblock of plane 1 when it holds 1..4 chunks (`tail_vectors`): `V`
/// chunk vectors from column `c0` (code 121 past `kp`) in `arrange` layout against `x` stored
/// so by `prep_int8`; lane L is chunk `L / (8 / V)`, its sum of `x` taken from those vectors.
struct Tail<'a, const NB: usize> {
    /// The group's plane-1 code row (`kp` bytes).
    codes: &'a [u8],
    c0: usize,
    kp: usize,
    /// Per batch vector: `xt256` (`c0 + 32 V` bytes and more) and `sx256` (`c0 / 32 + 8` values).
    xt: [&'a [i8]; NB],
    sx: [&'a [f32]; NB],
    /// The group's float plane-1 scale table (row stride `rs`, `c0 >> lb` + 8 values per row).
    t1: &'a [f32],
    rs: usize,
    lb: usize,
}

impl<const NB: usize> Tail<'_, NB> {
    /// # Safety
    /// AVX2 + FMA present; the slices are as documented on the fields.
    // Not inlined, and holding copies of the pointer arrays (not references to `group_int8`'s
    // locals): inlined, with references, it made LLVM compile `group_int8`'s plane-2 loop worse
    // (1535 x 512, no tail at all: 75.7 -> 91 us).
    #[inline(never)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add<const V: usize>(&self, acc: &mut [[__m256; NB]; R]) {
        let zero8 = _mm256_set1_epi8(121);
        let per = 8 / V; // lanes per chunk
        // SAFETY: code loads of whole chunks below kp = codes.len(); x loads at c0 + 32 u + 32 <=
        // c0 + 128 <= st256; the 8-float loads as documented on the fields.
        unsafe {
            let rows: [__m256i; V] = core::array::from_fn(|l| {
                let c = self.c0 + 32 * l;
                if c + 32 <= self.kp { _mm256_loadu_si256(self.codes.as_ptr().add(c) as *const __m256i) } else { zero8 }
            });
            let t = arrange::<V>(rows);
            let xv: [[__m256i; V]; NB] = core::array::from_fn(|b| core::array::from_fn(|u| _mm256_loadu_si256(self.xt[b].as_ptr().add(self.c0 + 32 * u) as *const __m256i)));
            let (ones8, ones16) = (_mm256_set1_epi8(1), _mm256_set1_epi16(1));
            let q: [__m256i; NB] = core::array::from_fn(|b| {
                xv[b].iter().fold(_mm256_setzero_si256(), |a, &v| _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16)))
            });
            let chunk = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let chunk = _mm256_srlv_epi32(chunk, _mm256_set1_epi32(per.trailing_zeros() as i32));
            let s: [__m256; NB] = core::array::from_fn(|b| _mm256_permutevar8x32_ps(_mm256_loadu_ps(self.sx[b].as_ptr().add(self.c0 / 32)), chunk));
            let blk = _mm256_srlv_epi32(_mm256_slli_epi32::<5>(chunk), _mm256_set1_epi32(self.lb as i32));
            let w: [__m256; R] = core::array::from_fn(|i| _mm256_permutevar8x32_ps(_mm256_loadu_ps(self.t1.as_ptr().add(i * self.rs + (self.c0 >> self.lb))), blk));
            superblock::<NB, V>(&t, &xv, &q, &s, &w, acc);
        }
    }
}

/// One group for batch vectors `b0..b0 + NB`, int8 activations: plane 1 and the plane-2
/// entries in superblocks of 8 transposed 32-column code vectors (`superblock`), so the float
/// work is one step per row per 256 columns; predators in float32.
///
/// # Safety
/// As for [`groups`]; `c.x` was prepared for int8 on this level (`st256`, `xt256`, `qsum256`,
/// `sx256`), and the scratch holds `2 * 5 * (nb + 16)` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_int8<const NB: usize>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let p = c.p;
    let x = c.x;
    let (bs, kp, nb) = (c.d.block_size, c.d.padded_cols, c.d.n_blocks);
    let lb = bs.trailing_zeros() as usize;
    let (st, nc) = (x.st256, x.st256 / 32);
    let rs = nb + 16;
    let (t1, t2) = scratch.f[..2 * R * rs].split_at_mut(R * rs);
    let es = c.p2_entries(g);
    let ne = es.len().min(nb);
    // Row i's block scales (plane 1 at t1[i rs + blk], plane 2 of the group's k-th entry at
    // t2[i rs + k]), as float32 with the row unit applied; 8 zeros after them (read by lanes
    // past the last block or entry; nothing reads further). Only those 8 are cleared: two
    // whole-row fills per row were 10 % of a 512-column product (memset calls).
    for i in 0..R {
        let r = g * R + i;
        let (d1, d2) = (&mut t1[i * rs..(i + 1) * rs], &mut t2[i * rs..(i + 1) * rs]);
        if r >= p.rows {
            d1.fill(0.0);
            d2.fill(0.0);
            continue;
        }
        d1[nb..nb + 8].fill(0.0);
        d2[ne..ne + 8].fill(0.0);
        let u = _mm256_set1_ps(crate::format::row_unit(p.row_scales[r]));
        let src = &p.scales[r * nb..(r + 1) * nb];
        let mut k = 0;
        while k + 8 <= nb {
            // SAFETY: k + 8 <= nb = src.len() <= d1.len().
            unsafe {
                let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.as_ptr().add(k) as *const __m128i));
                _mm256_storeu_ps(d1.as_mut_ptr().add(k), _mm256_mul_ps(_mm256_cvtepi32_ps(q), u));
            }
            k += 8;
        }
        for k in k..nb {
            d1[k] = crate::format::scale_value(src[k], p.row_scales[r]);
        }
        let (unit, p2s) = (crate::format::row_unit(p.row_scales[r]), &p.p2_scales[es.start * R..(es.start + ne) * R]);
        // (by a table: the scalar int-to-float conversion measured ~9 % of the kernel)
        for k in 0..ne {
            d2[k] = unit * U8_F32[p2s[k * R + i] as usize];
        }
    }
    let xt: [&[i8]; NB] = core::array::from_fn(|b| &x.xt256[(b0 + b) * st..(b0 + b + 1) * st]);
    let qs: [&[i32]; NB] = core::array::from_fn(|b| &x.qsum256[(b0 + b) * nc..(b0 + b + 1) * nc]);
    let ss: [&[f32]; NB] = core::array::from_fn(|b| &x.sx256[(b0 + b) * nc..(b0 + b + 1) * nc]);
    let mut acc = [[_mm256_setzero_ps(); NB]; R];
    let zero8 = _mm256_set1_epi8(121);

    // Plane 1: superblock sb covers columns 256 sb.. (the last one may pass kp: code 121 and
    // x = 0 there). Lane L is chunk 8 sb + L, in block (256 sb + 32 L) >> lb.
    let lane_blk = _mm256_srlv_epi32(_mm256_setr_epi32(0, 32, 64, 96, 128, 160, 192, 224), _mm256_set1_epi32(lb as i32));
    let codes = &p.codes[g * kp..(g + 1) * kp];
    // A short tail (1..4 chunks past the last whole superblock) in `arrange` layout, after them.
    let tail_v = tail_vectors(kp);
    let short = matches!(tail_v, 1 | 2 | 4);
    for sb in 0..st / 256 - short as usize {
        let c0 = 256 * sb;
        // SAFETY: code loads below kp = codes.len(); x loads at 256 sb + 32 v + 32 <= st; lane
        // loads at 8 sb + 8 <= nc; scale loads at i rs + (256 sb >> lb) + 8 <= i rs + nb + 8
        // (256 sb < kp + 256, and 256 >> lb <= 8).
        unsafe {
            for o in (0..256).step_by(64) {
                prefetch_code(codes.as_ptr().wrapping_add(c0 + AHEAD + o));
            }
            let rows: [__m256i; 8] = core::array::from_fn(|l| {
                if c0 + 32 * l + 32 <= kp { _mm256_loadu_si256(codes.as_ptr().add(c0 + 32 * l) as *const __m256i) } else { zero8 }
            });
            let t = transpose8(rows);
            let xv: [[__m256i; 8]; NB] = core::array::from_fn(|b| core::array::from_fn(|v| _mm256_loadu_si256(xt[b].as_ptr().add(c0 + 32 * v) as *const __m256i)));
            let q: [__m256i; NB] = core::array::from_fn(|b| _mm256_loadu_si256(qs[b].as_ptr().add(8 * sb) as *const __m256i));
            let s: [__m256; NB] = core::array::from_fn(|b| _mm256_loadu_ps(ss[b].as_ptr().add(8 * sb)));
            let w: [__m256; R] = core::array::from_fn(|i| _mm256_permutevar8x32_ps(_mm256_loadu_ps(t1.as_ptr().add(i * rs + (c0 >> lb))), lane_blk));
            superblock::<NB, 8>(&t, &xv, &q, &s, &w, &mut acc);
        }
    }
    if short {
        let tail = Tail { codes, c0: st - 256, kp, xt, sx: ss, t1, rs, lb };
        // SAFETY: features per this function's contract; `Tail` documents the sizes.
        unsafe {
            match tail_v {
                1 => tail.add::<1>(&mut acc),
                2 => tail.add::<2>(&mut acc),
                _ => tail.add::<4>(&mut acc),
            }
        }
    }

    // Plane 2: the entries' codes are contiguous, B / 32 chunk vectors each; 8 chunk vectors
    // (any entries) form a pseudo-superblock, lane L = chunk vector L, its x loaded from the
    // entry's block and transposed the same way. Lanes past the last chunk vector: code 121,
    // x 0, scale 0.
    let cpe = bs / 32;
    let lane_ent = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((lb - 5) as i32));
    let ncv = ne * cpe;
    let pc = &p.p2_codes[es.start * bs..(es.start + ne) * bs];
    for ps in 0..ncv.div_ceil(8) {
        let cv0 = 8 * ps;
        let cnt = (ncv - cv0).min(8);
        // (cpe is a power of two: shifts and masks, not divisions)
        let cols: [usize; 8] = core::array::from_fn(|l| {
            let cv = (cv0 + l).min(ncv - 1);
            (c.p2_block(es.start + (cv >> (lb - 5))) << lb) + 32 * (cv & (cpe - 1))
        });
        // SAFETY: code loads of chunk vectors < ncv inside pc; x loads at cols + 32 <= kp <=
        // stride (block < nb); lane values at cols / 32 < kp / 32 <= nc; scale loads at
        // i rs + cv0 / cpe + 8 <= i rs + ne + 8 <= (i + 1) rs.
        unsafe {
            for o in (0..256).step_by(64) {
                prefetch_code(pc.as_ptr().wrapping_add(32 * cv0 + AHEAD + o));
            }
            let rows: [__m256i; 8] = core::array::from_fn(|l| {
                if l < cnt { _mm256_loadu_si256(pc.as_ptr().add(32 * (cv0 + l)) as *const __m256i) } else { zero8 }
            });
            let t = transpose8(rows);
            let xv: [[__m256i; 8]; NB] = core::array::from_fn(|b| {
                let xq = x.xq(b0 + b);
                transpose8(core::array::from_fn(|l| if l < cnt { _mm256_loadu_si256(xq.as_ptr().add(cols[l]) as *const __m256i) } else { _mm256_setzero_si256() }))
            });
            let q: [__m256i; NB] = core::array::from_fn(|b| {
                let v: [i32; 8] = core::array::from_fn(|l| if l < cnt { qs[b][cols[l] / 32] } else { 0 });
                _mm256_loadu_si256(v.as_ptr() as *const __m256i)
            });
            let s: [__m256; NB] = core::array::from_fn(|b| {
                let v: [f32; 8] = core::array::from_fn(|l| if l < cnt { ss[b][cols[l] / 32] } else { 0.0 });
                _mm256_loadu_ps(v.as_ptr())
            });
            let w: [__m256; R] = core::array::from_fn(|i| _mm256_permutevar8x32_ps(_mm256_loadu_ps(t2.as_ptr().add(i * rs + (cv0 >> (lb - 5)))), lane_ent));
            superblock::<NB, 8>(&t, &xv, &q, &s, &w, &mut acc);
        }
    }

    let has_preds = !p.out_vals.is_empty();
    for i in 0..R {
        let r = g * R + i;
        for b in 0..NB {
            let mut y = hsum(acc[i][b]);
            if r < p.rows {
                // Entries past nb (only in an invalid matrix, whose blocks then repeat): by the
                // reference kernel's block sum.
                for e in es.start + ne..es.end {
                    let dot = super::scalar::block_int8(c, i, b0 + b, &p.p2_codes[e * bs..(e + 1) * bs], c.p2_block(e) << lb);
                    y += p.p2_scale(e, r) * dot as f32;
                }
                if has_preds {
                    // SAFETY: features per this function's contract.
                    y += unsafe { predators(c, r, x.xf(b0 + b)) };
                }
            }
            out[i * c.batch + b0 + b] = y;
        }
    }
}

/// Sum of `value * x[col]` over the predators of row `r` in float32 (as `predators_f32`, 8 at
/// a time: F16C conversions and gathers of x; columns clamped into `xf`).
///
/// # Safety
/// AVX2 + FMA + F16C present.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn predators(c: &Ctx, r: usize, xf: &[f32]) -> f32 {
    let p = c.p;
    let range = c.predators(r);
    let (cols, vals) = (&p.out_cols[range.clone()], &p.out_vals[range]);
    let n = cols.len().min(vals.len());
    let last = _mm256_set1_epi32(xf.len() as i32 - 1);
    let mut acc = _mm256_setzero_ps();
    let mut j = 0;
    // SAFETY: 8-element loads inside cols / vals (j + 8 <= n); gathered indices clamped to
    // < xf.len().
    unsafe {
        while j + 8 <= n {
            let i = _mm256_min_epu32(_mm256_loadu_si256(cols.as_ptr().add(j) as *const __m256i), last);
            let v = _mm256_cvtph_ps(_mm_loadu_si128(vals.as_ptr().add(j) as *const __m128i));
            acc = _mm256_fmadd_ps(v, _mm256_i32gather_ps::<4>(xf.as_ptr(), i), acc);
            j += 8;
        }
    }
    let mut y = hsum(acc);
    for k in j..n {
        let v = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(vals[k].to_bits() as i32)));
        y += v * xf.get(cols[k] as usize).copied().unwrap_or(0.0);
    }
    y
}

/// `q as f32` for every byte.
static U8_F32: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32;
        i += 1;
    }
    t
};
