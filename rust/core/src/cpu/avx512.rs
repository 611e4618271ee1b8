//! AVX-512 kernels (F, BW, VL, VBMI, VNNI, plus FMA and F16C).
//!
//! Per group, one pass over the 64-column vectors of its plane-1 codes, then over its plane-2
//! entries, then its predators. Each 64-byte code vector is decoded once for the five rows and
//! all batch vectors of the tile (see the module docs of `cpu` for the balanced trick):
//!
//! ```text
//! v = b - 121 (i8), a = |v|, m = sign mask of v             3 instructions, shared
//! digits of row i: vpermi2b(LUT_i, a)   (c' = t' + 1)       1 per row
//! int8:  xs = m ? -q : q, corr = -sum4(xs)                  3 per batch vector
//!        D_i = vpdpbusd(corr, c'_i, xs) = sum4(t_i q)       1 per row and batch vector
//! f32:   pos/neg bit masks of the 5 rows from 2 more LUTs, swapped where m, then masked adds
//! ```
//!
//! All pointer arithmetic stays inside the buffers whose sizes `Ctx` documents; the comments at
//! each `unsafe` say which size makes it in bounds.

#![allow(clippy::needless_range_loop)] // index loops over rows / batch vectors / lanes read best here

use super::{int8_superblocks, prefetch_code, Activations, Ctx, Scratch, AHEAD, BATCH_TILE};
use crate::format::{row_unit, ROWS_PER_GROUP};
use core::arch::x86_64::*;

const R: usize = ROWS_PER_GROUP;

/// Whether the CPU has every feature these kernels are compiled for.
pub(super) fn supported() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[repr(C, align(64))]
struct Lut([u8; 128]);

/// Balanced-ternary digit `i` (as `t + 1`) of `a` in 0..=121; 1 (t = 0) for 122..=127.
pub(super) const fn bal_digit(a: usize, i: usize) -> u8 {
    if a > 121 {
        return 1;
    }
    let mut x = a + 121; // the code byte whose balanced value is a
    let mut j = 0;
    while j < i {
        x /= 3;
        j += 1;
    }
    (x % 3) as u8
}

const fn digit_lut(i: usize) -> Lut {
    let mut t = [0u8; 128];
    let mut a = 0;
    while a < 128 {
        t[a] = bal_digit(a, i);
        a += 1;
    }
    Lut(t)
}

/// Bit i set where row i has digit `want` (0: t = -1, 2: t = +1).
const fn mask_lut(want: u8) -> Lut {
    let mut t = [0u8; 128];
    let mut a = 0;
    while a < 128 {
        let mut i = 0;
        while i < R {
            if a <= 121 && bal_digit(a, i) == want {
                t[a] |= 1 << i;
            }
            i += 1;
        }
        a += 1;
    }
    Lut(t)
}

static DIGIT_LUTS: [Lut; R] = [digit_lut(0), digit_lut(1), digit_lut(2), digit_lut(3), digit_lut(4)];
static POS_LUT: Lut = mask_lut(2);
static NEG_LUT: Lut = mask_lut(0);

/// A 128-entry byte table as the two registers `vpermi2b` indexes with a 7-bit index.
#[inline(always)]
unsafe fn lut_regs(l: &Lut) -> (__m512i, __m512i) {
    // SAFETY: `l.0` is 128 bytes, so both 64-byte loads are in bounds (caller has AVX-512F).
    unsafe {
        let p = l.0.as_ptr();
        (_mm512_loadu_si512(p as *const _), _mm512_loadu_si512(p.add(64) as *const _))
    }
}

/// Pointers to the prepared activations of the batch tile `b0..b0 + NB`.
struct XPtrs<const NB: usize> {
    xf: [*const f32; NB],
    xq: [*const i8; NB],
    nxq: [*const i8; NB],
    sxl: [*const f32; NB],
    sx: [*const f32; NB],
    xt: [*const i8; NB],
    sxt: [*const f32; NB],
    qsum: [*const i32; NB],
    qsumt: [*const i32; NB],
}

impl<const NB: usize> XPtrs<NB> {
    fn new(c: &Ctx, b0: usize) -> Self {
        let x = c.x;
        let s = x.stride;
        let int8 = c.act == Activations::Int8;
        XPtrs {
            xf: core::array::from_fn(|b| x.xf[(b0 + b) * s..].as_ptr()),
            xq: core::array::from_fn(|b| if int8 { x.xq[(b0 + b) * s..].as_ptr() } else { core::ptr::null() }),
            nxq: core::array::from_fn(|b| if int8 { x.nxq[(b0 + b) * s..].as_ptr() } else { core::ptr::null() }),
            sxl: core::array::from_fn(|b| if int8 { x.sxl[(b0 + b) * s / 4..].as_ptr() } else { core::ptr::null() }),
            sx: core::array::from_fn(|b| if int8 { x.sx[(b0 + b) * s / 32..].as_ptr() } else { core::ptr::null() }),
            xt: core::array::from_fn(|b| if int8 { x.xt[(b0 + b) * s..].as_ptr() } else { core::ptr::null() }),

            sxt: core::array::from_fn(|b| if int8 { x.sxt[(b0 + b) * s / 32..].as_ptr() } else { core::ptr::null() }),
            qsum: core::array::from_fn(|b| if int8 { x.qsum[(b0 + b) * s / 32..].as_ptr() } else { core::ptr::null() }),
            qsumt: core::array::from_fn(|b| if int8 { x.qsumt[(b0 + b) * s / 32..].as_ptr() } else { core::ptr::null() }),
        }
    }
}

type GroupFn = unsafe fn(&Ctx, usize, usize, usize, &mut [f32], &mut Scratch);

fn pick<const NB: usize>(act: Activations, b32: bool) -> GroupFn {
    match (act, b32) {
        (Activations::Int8, false) => group::<NB, false, true>,
        (Activations::Int8, true) => group::<NB, true, true>,
        (Activations::F32, false) => group::<NB, false, false>,
        (Activations::F32, true) => group::<NB, true, false>,
    }
}

fn pick_nb(nb: usize, act: Activations, b32: bool) -> GroupFn {
    match nb {
        1 => pick::<1>(act, b32),
        2 => pick::<2>(act, b32),
        3 => pick::<3>(act, b32),
        4 => pick::<4>(act, b32),
        5 => pick::<5>(act, b32),
        6 => pick::<6>(act, b32),
        7 => pick::<7>(act, b32),
        _ => pick::<8>(act, b32),
    }
}

/// Computes groups `g0..` into `out` ([group][row in group][batch]).
///
/// # Safety
/// The CPU supports the features in [`supported`]; `c` satisfies the sizes documented on `Ctx`;
/// `scratch` was made by `Scratch::new(&c.d)`.
pub(super) unsafe fn groups(c: &Ctx, g0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let per_group = R * c.batch;
    let b32 = c.d.block_size == 32;
    if c.batch <= BATCH_TILE {
        // SAFETY: forwarded from the caller; `group` for all c.batch vectors and every group
        // of `out`.
        unsafe { pick_nb(c.batch, c.act, b32)(c, g0, out.len() / per_group, 0, out, scratch) };
    } else {
        // Tiles of BATCH_TILE vectors, all of them per group (its codes stay in cache).
        for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
            let mut b0 = 0;
            while b0 < c.batch {
                let nb = (c.batch - b0).min(BATCH_TILE);
                let f = pick_nb(nb, c.act, b32);
                // SAFETY: forwarded from the caller; `f` is `group` for exactly `nb` vectors
                // from b0, one group.
                unsafe { f(c, g0 + gi, 1, b0, og, scratch) };
                b0 += nb;
            }
        }
    }
    if predators_after(c) {
        // SAFETY: forwarded from the caller.
        unsafe { add_predators(c, g0, out) };
    }
}

/// Whether the predators of a task's rows are added in one pass after all its groups
/// (`add_predators`) instead of at the end of each group: from K = 4096 on (x in float32 at
/// least half of L1), where it measured 2.5-3 % faster on 4096 x 14336 and 14336 x 4096 (2
/// threads, int8; neutral on 2048 x 8192); on SmolLM2's K = 576 and 1536 it measured 0-5 %
/// slower.
#[inline(always)]
fn predators_after(c: &Ctx) -> bool {
    c.d.padded_cols >= 4096
}

/// Adds the predators (float32, `value * x[col]`) of the rows of groups `g0..` to `out`, in one
/// pass after all their codes (see `predators_after`).
///
/// # Safety
/// As for [`groups`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn add_predators(c: &Ctx, g0: usize, out: &mut [f32]) {
    let per_group = R * c.batch;
    for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
        for i in 0..R {
            let r = (g0 + gi) * R + i;
            if r >= c.p.rows {
                continue;
            }
            // The predator arrays are two more streams: prefetch them as the code streams,
            // AHEAD bytes of columns on (the same number of values on).
            let rg = c.predators(r);
            let (cols, vals) = (c.p.out_cols.as_ptr(), c.p.out_vals.as_ptr());
            let ahead = AHEAD / 4; // out_cols is u32: 16 per line (out_vals, f16: 32)
            let mut j = rg.start & !15;
            while j < rg.end {
                prefetch_code(cols.wrapping_add(j + ahead));
                if j.is_multiple_of(32) {
                    prefetch_code(vals.wrapping_add(j + ahead));
                }
                j += 16;
            }
            for b in 0..c.batch {
                // SAFETY: xf holds `stride` floats per batch vector (Ctx sizes); features per
                // this function's contract.
                og[i * c.batch + b] += unsafe { predators(c, r, c.x.xf[b * c.x.stride..].as_ptr()) };
            }
        }
    }
}

/// Row stride of the scale tables in the scratch: nb + 16 (16 zeros after each row, read by
/// the half vector past the last block when B = 32 and by full 16-lane loads).
#[inline(always)]
fn srow(nb: usize) -> usize {
    nb + 16
}

/// u8 -> f32 of `n <= 16` 8-bit scale codes from `src` into `dst` (masked, so nothing past n
/// is touched).
///
/// # Safety
/// `src` and `dst` are valid for `n` elements; AVX-512F/BW/VL present.
#[inline(always)]
unsafe fn cvt8(src: *const u8, dst: *mut f32, n: usize) {
    let m: __mmask16 = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
    // SAFETY: lanes past n are masked off.
    unsafe { _mm512_mask_storeu_ps(dst, m, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, src as *const i8)))) };
}

/// Fills the scratch for group `g`: `f[i * srow(nb) + blk]` = plane-1 scale code of row i,
/// block blk, as f32 (this kernel accumulates in units of the row scale: see `group`) (0 for padding rows and for the 16 floats after each row). Used by the
/// 64-column steps (float32, and the int8 columns past the last whole superblock); the int8
/// superblocks read the 8-bit scale codes directly.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn row_scales(c: &Ctx, g: usize, scr: &mut Scratch) {
    let nb = c.d.n_blocks;
    let rs = srow(nb);
    let f = &mut scr.f[..R * rs];
    for i in 0..R {
        let r = g * R + i;
        let row = &mut f[i * rs..(i + 1) * rs];
        row[nb..].fill(0.0);
        if r >= c.p.rows {
            row[..nb].fill(0.0);
            continue;
        }
        let src = &c.p.scales[r * nb..(r + 1) * nb];
        let mut k = 0;
        while k < nb {
            // SAFETY: k + min(16, nb - k) <= nb = src.len() <= row.len().
            unsafe { cvt8(src.as_ptr().add(k), row.as_mut_ptr().add(k), nb - k) };
            k += 16;
        }
    }
}


/// Prefetch hint for the cache line holding `p` (any address: a prefetch never faults).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    // SAFETY: PREFETCHT0 is a hint; it cannot fault or change memory, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
}

/// Prefetches `len` elements from `s[start..]` (clamped to the slice), one hint per 64 bytes.
#[inline(always)]
fn prefetch_range<T>(s: &[T], start: usize, len: usize) {
    let start = start.min(s.len());
    let end = (start + len).min(s.len());
    let bytes = (end - start) * core::mem::size_of::<T>();
    let p = s[start..].as_ptr() as *const u8;
    let mut o = 0;
    while o < bytes {
        prefetch(p.wrapping_add(o));
        o += 64;
    }
}

/// Prefetches the per-group arrays of group `g` (scales, plane-2 entries' blocks and scales,
/// and its predators where they are added per group), read once each, to hide their latency
/// behind the current group.
#[inline(always)]
fn prefetch_group(c: &Ctx, g: usize) {
    let p = c.p;
    if g >= c.d.n_groups {
        return;
    }
    let nb = c.d.n_blocks;
    prefetch_range(&p.scales, g * R * nb, R * nb);
    let es = c.p2_entries(g);
    prefetch_range(&p.p2_block, es.start, es.len());
    prefetch_range(&p.p2_scales, es.start * R, es.len() * R);
    if !predators_after(c) {
        let r0 = g * R;
        let r1 = (r0 + R).min(p.rows);
        let m = p.out_vals.len();
        let (a, b) = ((p.out_ptr[r0] as usize).min(m), (p.out_ptr[r1] as usize).min(m));
        prefetch_range(&p.out_cols, a, b.saturating_sub(a));
        prefetch_range(&p.out_vals, a, b.saturating_sub(a));
    }
}

/// The int8 activations of one batch vector for this kernel: `xf` is the padded float32 vector
/// (`stride` values, a multiple of 64). Writes exactly what the scalar `Prep::new` writes: per
/// 32-column chunk j the scale `sx[j]` and codes `xq[32 j..]` of `quantize_chunk` (same
/// division, round half to even, clamp; NaN scale and zero codes for a chunk with a non-finite
/// value, zero scale and codes for an all-zero chunk), the chunk sums `qsum[j]`, and for the
/// first `n_sb` superblocks the layout `xt`, `sxt`, `qsumt` (`transpose8` of the superblock's
/// codes; scales and sums permuted to lane order).
///
/// # Safety
/// The CPU has the features of `group`; `xf.len() == xq.len() == xt.len()` is a multiple of
/// 64, `sx`, `qsum`, `sxt`, `qsumt` hold `xf.len() / 32` values, and `512 n_sb <= xf.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,fma,f16c")]
#[allow(clippy::too_many_arguments)] // the seven arrays of one batch vector
pub(super) unsafe fn prep_int8(
    xf: &[f32],
    xq: &mut [i8],
    sx: &mut [f32],
    qsum: &mut [i32],
    xt: &mut [i8],
    sxt: &mut [f32],
    qsumt: &mut [i32],
    n_sb: usize,
) {
    let chunks = xf.len() / 32;
    assert!(xq.len() == 32 * chunks && xt.len() == 32 * chunks && sx.len() == chunks && qsum.len() == chunks);
    assert!(sxt.len() == chunks && qsumt.len() == chunks && 512 * n_sb <= xf.len());
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let fmax = _mm512_set1_ps(f32::MAX);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for j in 0..chunks {
        // SAFETY: 32 j + 32 <= xf.len() = xq.len(); j < chunks = sx.len() = qsum.len().
        unsafe {
            let a = _mm512_loadu_ps(xf.as_ptr().add(32 * j));
            let b = _mm512_loadu_ps(xf.as_ptr().add(32 * j + 16));
            let aa = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), abs_mask));
            let ab = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), abs_mask));
            // |v| <= MAX is false for NaN and +-Inf alike.
            let finite = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(aa, fmax) & _mm512_cmp_ps_mask::<_CMP_LE_OQ>(ab, fmax);
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
            let s = if finite != 0xFFFF { f32::NAN } else { amax / 127.0 };
            let (qa, qb) = if finite == 0xFFFF && s != 0.0 {
                let sv = _mm512_set1_ps(s);
                let ra = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_div_ps(a, sv));
                let rb = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_div_ps(b, sv));
                (_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(ra, lo), hi)), _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(rb, lo), hi)))
            } else {
                (_mm512_setzero_si512(), _mm512_setzero_si512())
            };
            sx[j] = s;
            qsum[j] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            _mm_storeu_si128(xq.as_mut_ptr().add(32 * j) as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128(xq.as_mut_ptr().add(32 * j + 16) as *mut __m128i, _mm512_cvtsepi32_epi8(qb));
        }
    }
    // SAFETY: 16 aligned i32.
    let lanes = unsafe { _mm512_load_si512(LANE_CHUNK.0.as_ptr() as *const _) };
    for sb in 0..n_sb {
        // SAFETY: 512 sb + 512 <= xf.len() = xq.len() = xt.len(); 16 sb + 16 <= chunks.
        unsafe {
            let v: [__m512i; 8] = core::array::from_fn(|i| _mm512_loadu_si512(xq.as_ptr().add(512 * sb + 64 * i) as *const _));
            for (i, t) in transpose8(v).into_iter().enumerate() {
                _mm512_storeu_si512(xt.as_mut_ptr().add(512 * sb + 64 * i) as *mut _, t);
            }
            _mm512_storeu_ps(sxt.as_mut_ptr().add(16 * sb), _mm512_permutexvar_ps(lanes, _mm512_loadu_ps(sx.as_ptr().add(16 * sb))));
            let q = _mm512_loadu_si512(qsum.as_ptr().add(16 * sb) as *const _);
            _mm512_storeu_si512(qsumt.as_mut_ptr().add(16 * sb) as *mut _, _mm512_permutexvar_epi32(lanes, q));
        }
    }
}

/// The 64 code bytes of `s` from `at` on, code 121 (five ternary zeros) past the end of `s`:
/// a masked load, so nothing past `s` is read (a partial superblock or plane-2 set).
///
/// # Safety
/// The CPU has AVX-512F/BW.
#[inline(always)]
unsafe fn codes_or_zero(s: &[u8], at: usize) -> __m512i {
    let n = s.len().saturating_sub(at).min(64);
    let m: __mmask64 = if n == 64 { !0 } else { (1u64 << n) - 1 };
    // SAFETY: the mask covers s[at..at + n] only, inside `s`; features per the contract.
    unsafe { _mm512_mask_loadu_epi8(_mm512_set1_epi8(121), m, s.as_ptr().wrapping_add(at) as *const i8) }
}

/// Transposes 8 vectors of 16 dwords (the 8 x 64 code bytes of a superblock, dword = 4
/// columns): output `w`, dword `L = 4 m + j` = input `4 (m / 2) + j`, dword `8 (m % 2) + w`,
/// i.e. the 4 columns at offset `4 w` of chunk `lane_chunk(L)`. Two stages of in-lane unpacks
/// and one of 128-bit shuffles (24 shuffles).
#[inline(always)]
unsafe fn transpose8(t: [__m512i; 8]) -> [__m512i; 8] {
    let a = [
        _mm512_unpacklo_epi32(t[0], t[1]),
        _mm512_unpackhi_epi32(t[0], t[1]),
        _mm512_unpacklo_epi32(t[2], t[3]),
        _mm512_unpackhi_epi32(t[2], t[3]),
        _mm512_unpacklo_epi32(t[4], t[5]),
        _mm512_unpackhi_epi32(t[4], t[5]),
        _mm512_unpacklo_epi32(t[6], t[7]),
        _mm512_unpackhi_epi32(t[6], t[7]),
    ];
    // b[4q + u], 128-bit lane l, dword j = t[4q + j], dword 4l + u.
    let b = [
        _mm512_unpacklo_epi64(a[0], a[2]),
        _mm512_unpackhi_epi64(a[0], a[2]),
        _mm512_unpacklo_epi64(a[1], a[3]),
        _mm512_unpackhi_epi64(a[1], a[3]),
        _mm512_unpacklo_epi64(a[4], a[6]),
        _mm512_unpackhi_epi64(a[4], a[6]),
        _mm512_unpacklo_epi64(a[5], a[7]),
        _mm512_unpackhi_epi64(a[5], a[7]),
    ];
    // Output w = 4h + u: 128-bit lanes (b[u].l(h), b[u].l(2 + h), b[4 + u].l(h), b[4 + u].l(2 + h)).
    [
        _mm512_shuffle_i32x4::<0x88>(b[0], b[4]),
        _mm512_shuffle_i32x4::<0x88>(b[1], b[5]),
        _mm512_shuffle_i32x4::<0x88>(b[2], b[6]),
        _mm512_shuffle_i32x4::<0x88>(b[3], b[7]),
        _mm512_shuffle_i32x4::<0xdd>(b[0], b[4]),
        _mm512_shuffle_i32x4::<0xdd>(b[1], b[5]),
        _mm512_shuffle_i32x4::<0xdd>(b[2], b[6]),
        _mm512_shuffle_i32x4::<0xdd>(b[3], b[7]),
    ]
}

/// For each lane L of a superblock: its chunk `c = lane_chunk(L)` (32 columns), the
/// block-or-entry `32 c / B` it lies in (relative to the superblock), and its chunk offset
/// inside that block `c % (B / 32)`.
const fn lane_tables(bs: usize) -> ([i32; 16], [i32; 16]) {
    let (mut unit, mut off) = ([0i32; 16], [0i32; 16]);
    let mut l = 0;
    while l < 16 {
        let c = super::lane_chunk(l);
        unit[l] = (32 * c / bs) as i32;
        off[l] = (c % (bs / 32)) as i32;
        l += 1;
    }
    (unit, off)
}

#[repr(C, align(64))]
struct Idx([i32; 16]);

/// Word index (into the 5 plane-2 scale codes per entry of a pseudo-superblock, widened to
/// words) of row `i` for lane L: `5 unit[L] + i`, in the low 16 words (upper 16 unused). For B = 32 (16 entries,
/// 80 words) indices from 64 on are taken from a third register (`P2_HI`).
#[repr(C, align(64))]
struct WordIdx([u16; 32]);

const fn p2_word_table(bs: usize, i: usize) -> WordIdx {
    let unit = lane_tables(bs).0;
    let mut t = [0u16; 32];
    let mut l = 0;
    while l < 16 {
        t[l] = (unit[l] as usize * R + i) as u16;
        l += 1;
    }
    WordIdx(t)
}

const fn p2_word_tables(bs: usize) -> [WordIdx; R] {
    [p2_word_table(bs, 0), p2_word_table(bs, 1), p2_word_table(bs, 2), p2_word_table(bs, 3), p2_word_table(bs, 4)]
}

static P2_WORD: [[WordIdx; R]; 4] = [p2_word_tables(32), p2_word_tables(64), p2_word_tables(128), p2_word_tables(256)];

/// For B = 32: the lanes of row i whose word index is >= 64.
const P2_HI: [__mmask32; R] = {
    let mut m = [0u32; R];
    let mut i = 0;
    while i < R {
        let t = p2_word_table(32, i).0;
        let mut l = 0;
        while l < 16 {
            if t[l] >= 64 {
                m[i] |= 1 << l;
            }
            l += 1;
        }
        i += 1;
    }
    m
};

/// Lane L's chunk `lane_chunk(L)`: permutes a vector in chunk order into lane order.
static LANE_CHUNK: Idx = Idx(lane_chunks());

const fn lane_chunks() -> [i32; 16] {
    let mut t = [0i32; 16];
    let mut l = 0;
    while l < 16 {
        t[l] = super::lane_chunk(l) as i32;
        l += 1;
    }
    t
}

/// For B >= 64, qword k (0..8) of a pseudo-superblock's chunk values (chunks 2k and 2k+1, one
/// block: B / 32 >= 2 chunks per block): the entry it lies in (`.0`) and its qword offset inside
/// the entry's block (`.1`); lanes 8..16 unused. Index 0 (B = 32) is unused.
const fn qword_tables(bs: usize) -> ([i32; 16], [i32; 16]) {
    let (mut ent, mut off) = ([0i32; 16], [0i32; 16]);
    let per = if bs >= 64 { bs / 32 } else { 2 };
    let mut k = 0;
    while k < 8 {
        ent[k] = (2 * k / per) as i32;
        off[k] = ((2 * k % per) / 2) as i32;
        k += 1;
    }
    (ent, off)
}

static QWORD_ENT: [Idx; 4] = [Idx(qword_tables(32).0), Idx(qword_tables(64).0), Idx(qword_tables(128).0), Idx(qword_tables(256).0)];
static QWORD_OFF: [Idx; 4] = [Idx(qword_tables(32).1), Idx(qword_tables(64).1), Idx(qword_tables(128).1), Idx(qword_tables(256).1)];

static LANE_UNIT: [Idx; 4] = [Idx(lane_tables(32).0), Idx(lane_tables(64).0), Idx(lane_tables(128).0), Idx(lane_tables(256).0)];
static LANE_OFF: [Idx; 4] = [Idx(lane_tables(32).1), Idx(lane_tables(64).1), Idx(lane_tables(128).1), Idx(lane_tables(256).1)];

/// Digits `c` of rows 0..3 of a code byte in one byte, two bits each (`c_0 | c_1 << 2 |
/// c_2 << 4 | c_3 << 6`), for the superblock kernel: `[0]` for bytes 0..128, `[1]` for
/// 128..256 (invalid bytes 243..255 read as ternary zeros). Row 4 needs no table (below).
const fn packed_luts() -> [Lut; 2] {
    let mut t = [[0u8; 128]; 2];
    let mut b = 0;
    while b < 256 {
        let v = if b < 243 { b } else { 121 };
        let (mut x, mut i, mut packed) = (v, 0, 0u8);
        while i < 4 {
            packed |= ((x % 3) as u8) << (2 * i);
            x /= 3;
            i += 1;
        }
        t[b / 128][b % 128] = packed;
        b += 1;
    }
    [Lut(t[0]), Lut(t[1])]
}

static PACKED_LUTS: [Lut; 2] = packed_luts();

/// The inverse of 81 modulo 2^32: `(81 n) * INV81 = n` in wrapping i32 arithmetic.
const INV81: i32 = {
    // Newton iteration for the inverse of an odd number modulo 2^32.
    let mut inv: u32 = 81;
    let mut k = 0;
    while k < 5 {
        inv = inv.wrapping_mul(2u32.wrapping_sub(81u32.wrapping_mul(inv)));
        k += 1;
    }
    inv as i32
};

/// Integer accumulators of one superblock, per batch vector b. With `D_i = sum_k c_ik q_k`
/// (digits `c = t + 1`, not yet corrected): `e[k][b] = sum_{i <= k} 4^i D_i` for k = 0..4
/// (rows 0..3 from the packed digits masked to 2, 4, 6, 8 bits) and `e[4][b] = sum_k b_k q_k
/// = sum_i 3^i D_i` (the raw code byte). Exactly: `D_i = (e[i] - e[i-1]) >> 2i` for i < 4 and
/// `D_4 = (e[4] - D_0 - 3 D_1 - 9 D_2 - 27 D_3) / 81`; the ternary dot of lane L (one
/// 32-column chunk) is `D_i - sum_{k in chunk} q_k`. (|e[4]| <= 8 * 4 * 242 * 127 fits i32.)
struct SbAcc<const NB: usize> {
    e: [[__m512i; NB]; R],
}

/// Feeds one transposed code vector `cv` and the matching activations `q` (per batch vector)
/// into the superblock accumulators: two `vpermi2b` (256-entry table) and a blend for the
/// packed digits of rows 0..3, three ANDs, five `vpdpbusd` per batch vector.
#[inline(always)]
unsafe fn sb_step<const NB: usize>(cv: __m512i, q: [__m512i; NB], packed: &[(__m512i, __m512i); 2], acc: &mut SbAcc<NB>) {
    let hi: __mmask64 = _mm512_movepi8_mask(cv);
    let c3 = _mm512_mask_blend_epi8(
        hi,
        _mm512_permutex2var_epi8(packed[0].0, cv, packed[0].1),
        _mm512_permutex2var_epi8(packed[1].0, cv, packed[1].1),
    );
    let c2 = _mm512_and_si512(c3, _mm512_set1_epi8(0x3F));
    let c1 = _mm512_and_si512(c3, _mm512_set1_epi8(0x0F));
    let c0 = _mm512_and_si512(c3, _mm512_set1_epi8(0x03));
    for b in 0..NB {
        acc.e[0][b] = _mm512_dpbusd_epi32(acc.e[0][b], c0, q[b]);
        acc.e[1][b] = _mm512_dpbusd_epi32(acc.e[1][b], c1, q[b]);
        acc.e[2][b] = _mm512_dpbusd_epi32(acc.e[2][b], c2, q[b]);
        acc.e[3][b] = _mm512_dpbusd_epi32(acc.e[3][b], c3, q[b]);
        acc.e[4][b] = _mm512_dpbusd_epi32(acc.e[4][b], cv, q[b]);
    }
}

/// Adds a finished superblock to the float accumulators:
/// `acc[i][b] += (D_i - qs[b]) * sw[i] * sx[b]` (`qs` = the lanes' chunk sums of q).
#[inline(always)]
unsafe fn sb_finish<const NB: usize>(s: &SbAcc<NB>, qs: &[__m512i; NB], sw: &[__m512; R], sx: &[__m512; NB], acc: &mut [[__m512; NB]; R]) {
    for b in 0..NB {
        let e = [s.e[0][b], s.e[1][b], s.e[2][b], s.e[3][b], s.e[4][b]];
        let d1 = _mm512_srai_epi32::<2>(_mm512_sub_epi32(e[1], e[0]));
        let d2 = _mm512_srai_epi32::<4>(_mm512_sub_epi32(e[2], e[1]));
        let d3 = _mm512_srai_epi32::<6>(_mm512_sub_epi32(e[3], e[2]));
        // e4 - (D0 + 3 D1 + 9 D2 + 27 D3) = e4 - e0 - 3 (D1 + 3 (D2 + 3 D3)) = 81 D4.
        let three = |v: __m512i| _mm512_add_epi32(v, _mm512_add_epi32(v, v));
        let inner = _mm512_add_epi32(d1, three(_mm512_add_epi32(d2, three(d3))));
        let r81 = _mm512_sub_epi32(_mm512_sub_epi32(e[4], e[0]), three(inner));
        let d4 = _mm512_mullo_epi32(r81, _mm512_set1_epi32(INV81));
        let d = [e[0], d1, d2, d3, d4];
        for i in 0..R {
            let t = _mm512_cvtepi32_ps(_mm512_sub_epi32(d[i], qs[b]));
            acc[i][b] = _mm512_fmadd_ps(t, _mm512_mul_ps(sw[i], sx[b]), acc[i][b]);
        }
    }
}

/// One plane of one superblock: the 8 transposed code vectors `t` against the transposed
/// activations `q` per vector and batch vector, accumulated into `acc` with lane chunk sums
/// `qs`, lane scales `sw` (per row) and `sx` (per batch vector).
///
/// # Safety
/// The CPU has the features of `group`.
#[inline(always)]
unsafe fn sb_plane<const NB: usize>(
    t: &[__m512i; 8],
    q: &[[__m512i; NB]; 8],
    qs: &[__m512i; NB],
    packed: &[(__m512i, __m512i); 2],
    sw: &[__m512; R],
    sx: &[__m512; NB],
    acc: &mut [[__m512; NB]; R],
) {
    let mut s = SbAcc::<NB> { e: [[_mm512_setzero_si512(); NB]; R] };
    for v in 0..8 {
        // SAFETY: features per the caller.
        unsafe { sb_step::<NB>(t[v], q[v], packed, &mut s) };
    }
    // SAFETY: features per the caller.
    unsafe { sb_finish::<NB>(&s, qs, sw, sx, acc) };
}

/// Groups `g0..g0 + count` for batch vectors `b0..b0 + NB`, results into `out` ([group][row
/// in group][batch], `count` groups). `B32`: block size 32 (a 64-column vector spans two
/// blocks). `INT8`: int8 activations, else float32. The loop over groups is in here so that
/// what does not depend on the group (activation pointers, lookup tables, lane tables) is set
/// up once per call, not once per group: on K = 512..2048 that setup, the per-group call and
/// a call per row for the predators were ~45 ns per group against ~37 per superblock.
///
/// # Safety
/// As for [`groups`]; `out` holds `count * 5 * c.batch` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,fma,f16c")]
unsafe fn group<const NB: usize, const B32: bool, const INT8: bool>(
    c: &Ctx,
    g0: usize,
    count: usize,
    b0: usize,
    out: &mut [f32],
    scr: &mut Scratch,
) {
    let p = c.p;
    let (bs, kp, nb) = (c.d.block_size, c.d.padded_cols, c.d.n_blocks);
    // B is a power of two: shifts instead of divisions in the loops.
    let lb = bs.trailing_zeros() as usize;
    let x = XPtrs::<NB>::new(c, b0);
    // SAFETY: the tables are 128 bytes each (AVX-512F present).
    let digit = unsafe { [0, 1, 2, 3, 4].map(|i| lut_regs(&DIGIT_LUTS[i])) };
    let pn = unsafe { [lut_regs(&POS_LUT), lut_regs(&NEG_LUT)] };
    // SAFETY: as above.
    let packed = unsafe { [lut_regs(&PACKED_LUTS[0]), lut_regs(&PACKED_LUTS[1])] };
    let rs = srow(nb);
    let full = kp / 64;
    let bsi = lb - 5; // 0..4 for B = 32..256
    // SAFETY (all loads of the lane tables): 16 aligned i32 each.
    let unit = unsafe { _mm512_load_si512(LANE_UNIT[bsi].0.as_ptr() as *const _) };
    let n_sb = if INT8 { int8_superblocks(kp) } else { 0 };
    // Blocks per superblock, and so plane-2 entries (one block each) per pseudo-superblock.
    let bps = 512 >> lb;
    // SAFETY: 16 aligned i32.
    let off = unsafe { _mm512_load_si512(LANE_OFF[bsi].0.as_ptr() as *const _) };
    let last_blk = _mm512_set1_epi32(nb as i32 - 1);
    let preds = Preds::of(c);
    for (gi, out) in out.chunks_exact_mut(R * c.batch).take(count).enumerate() {
        let g = g0 + gi;
        // Every scale below is the 8-bit code as f32: both planes of a row share its row scale
        // row_scales[r] / 256, applied once to the row's sum before the predators are added.
        // (int8 reads the scale codes straight from the u8 arrays, superblocks and the columns
        // past them alike: filling the table for a K = 576 product's one 64-column tail vector
        // cost about as much as the vector itself.)
        if !INT8 {
            // SAFETY: scratch size and CPU features per this function's contract.
            unsafe { row_scales(c, g, scr) };
        }
        if b0 == 0 {
            prefetch_group(c, g + 1);
        }
        let mut acc = [[_mm512_setzero_ps(); NB]; R];
        let sf = &scr.f[..R * rs];

        // The plane-1 row scales of the 64-column vector `v`: (lanes/quarters of the first 32
        // columns, of the last 32); equal unless B = 32. float32: from the table `row_scales`
        // filled; int8: from the 8-bit codes (0 for padding rows, and for the block past the
        // last when B = 32 and the last vector is half padding, as in the table).
        let scales = |v: usize| -> [(__m512, __m512); R] {
            core::array::from_fn(|i| {
                let code = |blk: usize| -> f32 {
                    if INT8 {
                        let r = g * R + i;
                        if r < p.rows && blk < nb { p.scales[r * nb + blk] as f32 } else { 0.0 }
                    } else {
                        sf[i * rs + blk]
                    }
                };
                if B32 {
                    (_mm512_set1_ps(code(2 * v)), _mm512_set1_ps(code(2 * v + 1)))
                } else {
                    let a = _mm512_set1_ps(code((v * 64) >> lb));
                    (a, a)
                }
            })
        };

        let base = &p.codes[g * kp..(g + 1) * kp];
        // The plane-1 scale codes of a superblock: row i's `bps` blocks from `s1_row[i] + first`
        // (masked load; nothing at all for padding rows, which then get scale 0).
        let s1_row: [usize; R] = core::array::from_fn(|i| if g * R + i < p.rows { (g * R + i) * nb } else { 0 });
        let s1_mask: [__mmask16; R] = core::array::from_fn(|i| if g * R + i < p.rows { (((1u32 << bps) - 1) & 0xFFFF) as __mmask16 } else { 0 });
        // Superblocks of 512 columns (int8): codes transposed so lane L of all 8 vectors is one
        // 32-column chunk, int32 sums over the superblock, one float step per row.
        // One superblock `sb` of codes `src` (already loaded), its blocks `in_row` (a mask of the
        // bps blocks: all but in a partial last one).
        let plane1 = |sb: usize, src: [__m512i; 8], in_row: __mmask16, acc: &mut [[__m512; NB]; R]| {
            let first = sb * bps;
            // SAFETY: AVX-512F present.
            let t1 = unsafe { transpose8(src) };
            // SAFETY: sxt and qsumt hold stride / 32 >= 16 sb + 16 values per batch vector
            // (stride >= 512 int8_superblocks(kp): `Prep::new`); the masked scale load reads row
            // r's blocks first.. below nb, inside `scales` (N * nb); features per this function's
            // contract.
            unsafe {
                let sx: [__m512; NB] = core::array::from_fn(|b| _mm512_loadu_ps(x.sxt[b].add(16 * sb)));
                let sw: [__m512; R] = core::array::from_fn(|i| {
                    let h = _mm_maskz_loadu_epi8(s1_mask[i] & in_row, p.scales.as_ptr().wrapping_add(s1_row[i] + first) as *const i8);
                    _mm512_permutexvar_ps(unit, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h)))
                });
                let qs: [__m512i; NB] = core::array::from_fn(|b| _mm512_loadu_si512(x.qsumt[b].add(16 * sb) as *const _));
                let mut q = [[_mm512_setzero_si512(); NB]; 8];
                for v in 0..8 {
                    for b in 0..NB {
                        // 512 sb + 512 <= stride bytes of xt per batch vector (as above).
                        q[v][b] = _mm512_loadu_si512(x.xt[b].add(512 * sb + 64 * v) as *const _);
                    }
                }
                sb_plane::<NB>(&t1, &q, &qs, &packed, &sw, &sx, acc);
            }
        };
        let whole = kp / 512;
        for sb in 0..whole.min(n_sb) {
            // The code rows of all groups are one contiguous stream: prefetch AHEAD bytes on
            // (into the next group's row near the end of this one).
            let row_at = g * kp + 512 * sb + AHEAD;
            for s in 0..8 {
                prefetch_code(p.codes.as_ptr().wrapping_add(row_at + 64 * s));
            }
            // SAFETY: 512 sb + 512 <= kp = base.len().
            let src: [__m512i; 8] = unsafe { core::array::from_fn(|s| _mm512_loadu_si512(base.as_ptr().add(512 * sb + 64 * s) as *const _)) };
            plane1(sb, src, !0, &mut acc);
        }
        if n_sb > whole {
            // The last, partial superblock (`int8_superblocks`): only its bytes below kp are
            // read (masked; code 121 past them), only its blocks below nb.
            let sb = whole;
            // SAFETY: `codes_or_zero` reads below kp = base.len() only; AVX-512BW present.
            let src: [__m512i; 8] = unsafe {
                core::array::from_fn(|s| codes_or_zero(base, 512 * sb + 64 * s))
            };
            plane1(sb, src, ((1u32 << (nb - sb * bps)) - 1) as __mmask16, &mut acc);
        }

        // Plane 2 (int8): 512 contiguous code bytes = 512 / B consecutive entries of the group
        // (any blocks) form a pseudo-superblock, transposed like a superblock; the activations of
        // their blocks are loaded and transposed the same way.
        let es = c.p2_entries(g);
        // Entries handled here (the scale table holds nb); a last, partial pseudo-superblock is
        // padded with code 121 (five ternary zeros), whose lanes then add exactly 0.
        let n_valid = if INT8 { es.len().min(nb) } else { 0 };
        let n_ps = n_valid.div_ceil(bps);
        for ps in 0..n_ps {
            let e0 = es.start + ps * bps;
            let cnt = (n_valid - ps * bps).min(bps);
            // The entries' cnt * B code bytes; past them (a last, partial pseudo-superblock) the
            // masked loads below read code 121.
            let codes = &p.p2_codes[e0 * bs..(e0 + cnt) * bs];
            for s in 0..8 {
                prefetch_code(p.p2_codes.as_ptr().wrapping_add(e0 * bs + AHEAD + 64 * s));
            }
            // SAFETY: the code loads read codes.len() = cnt * B bytes (whole when cnt = bps, else
            // masked); the masked p2_block load reads cnt entries < E; every activation load below
            // starts at a block start (block clamped to < nb) plus an offset with offset + 64 <= B
            // (or 32 bytes at offset 0 when B = 32), so it ends before kp + 32 <= stride; the
            // gather reads sx[blk * B / 32 + off] < kp / 32 <= stride / 32 (sx and qsum); the
            // masked p2_scales loads read the cnt * 5 values of entries e0..e0 + cnt <= E;
            // features per this function's contract.
            unsafe {
                // The entries' blocks (0 past cnt), clamped to < nb, and their first columns (one
                // vector, stored once for the scalar address arithmetic of the x loads).
                let m: __mmask16 = if cnt >= 16 { 0xFFFF } else { (1u16 << cnt) - 1 };
                let eb = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p.p2_block.as_ptr().add(e0) as *const i16));
                let eb = _mm512_min_epu32(eb, last_blk);
                let mut col0 = Idx([0; 16]);
                _mm512_store_si512(col0.0.as_mut_ptr() as *mut _, _mm512_sllv_epi32(eb, _mm512_set1_epi32(lb as i32)));
                let col0 = &col0.0;
                let src: [__m512i; 8] = if cnt == bps {
                    core::array::from_fn(|s| _mm512_loadu_si512(codes.as_ptr().add(64 * s) as *const _))
                } else {
                    core::array::from_fn(|s| codes_or_zero(codes, 64 * s))
                };
                let t2 = transpose8(src);
                let mut q = [[_mm512_setzero_si512(); NB]; 8];
                for b in 0..NB {
                    let xq = x.xq[b];
                    let xs: [__m512i; 8] = core::array::from_fn(|s| {
                        if B32 {
                            let lo = _mm256_loadu_si256(xq.add(col0[2 * s] as usize) as *const __m256i);
                            let hi = _mm256_loadu_si256(xq.add(col0[2 * s + 1] as usize) as *const __m256i);
                            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                        } else {
                            _mm512_loadu_si512(xq.add(col0[(64 * s) >> lb] as usize + ((64 * s) & (bs - 1))) as *const _)
                        }
                    });
                    let xt = transpose8(xs);
                    for v in 0..8 {
                        q[v][b] = xt[v];
                    }
                }
                // Lane L: entry unit[L] of the pseudo-superblock, chunk off[L] of its block: its
                // chunk scale sx and chunk sum qs. B = 32: one 16-lane gather each. B >= 64: the two
                // chunks 2k, 2k+1 of the pseudo-superblock lie in one block, so one 8-qword gather
                // fetches all 16 in chunk order and a permute puts them in lane order (half the
                // gathered elements; the gathers were ~7% of an int8 product's time).
                let (sx, qs): ([__m512; NB], [__m512i; NB]) = if B32 {
                    let blocks = _mm512_permutexvar_epi32(unit, eb);
                    let idx = _mm512_add_epi32(_mm512_sllv_epi32(blocks, _mm512_set1_epi32(bsi as i32)), off);
                    (
                        core::array::from_fn(|b| _mm512_i32gather_ps::<4>(idx, x.sx[b])),
                        core::array::from_fn(|b| _mm512_i32gather_epi32::<4>(idx, x.qsum[b])),
                    )
                } else {
                    let ent = _mm512_load_si512(QWORD_ENT[bsi].0.as_ptr() as *const _);
                    let qoff = _mm512_load_si512(QWORD_OFF[bsi].0.as_ptr() as *const _);
                    let lanes = _mm512_load_si512(LANE_CHUNK.0.as_ptr() as *const _);
                    // qword index of chunks 2k, 2k+1: block * B / 64 + offset
                    let qi = _mm512_add_epi32(_mm512_sllv_epi32(_mm512_permutexvar_epi32(ent, eb), _mm512_set1_epi32(bsi as i32 - 1)), qoff);
                    let qi = _mm512_castsi512_si256(qi);
                    (
                        core::array::from_fn(|b| {
                            let v = _mm512_i32gather_epi64::<8>(qi, x.sx[b] as *const i64);
                            _mm512_permutexvar_ps(lanes, _mm512_castsi512_ps(v))
                        }),
                        core::array::from_fn(|b| {
                            let v = _mm512_i32gather_epi64::<8>(qi, x.qsum[b] as *const i64);
                            _mm512_permutexvar_epi32(lanes, v)
                        }),
                    )
                };
                // Plane-2 scale codes: the cnt * 5 bytes of the entries (masked loads, zeros past
                // them) widened to words, row i of lane L's entry picked by a word permute.
                let nw = cnt * R;
                let wm = |lo: usize| -> __mmask32 {
                    let n = nw.saturating_sub(lo).min(32);
                    if n == 32 { !0 } else { (1u32 << n) - 1 }
                };
                let ws = p.p2_scales.as_ptr().add(e0 * R) as *const i8;
                let w0 = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(wm(0), ws));
                let w1 = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(wm(32), ws.wrapping_add(32)));
                let w2 = if B32 { _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(wm(64), ws.wrapping_add(64))) } else { _mm512_setzero_si512() };
                let sw: [__m512; R] = core::array::from_fn(|i| {
                    let idx = _mm512_load_si512(P2_WORD[bsi][i].0.as_ptr() as *const _);
                    let mut v = _mm512_permutex2var_epi16(w0, idx, w1);
                    if B32 {
                        // Lanes whose word is past 64 (entries 13.. of 16) come from w2.
                        v = _mm512_mask_blend_epi16(P2_HI[i], v, _mm512_permutexvar_epi16(_mm512_sub_epi16(idx, _mm512_set1_epi16(64)), w2));
                    }
                    _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)))
                });
                sb_plane::<NB>(&t2, &q, &qs, &packed, &sw, &sx, &mut acc);
            }
        }

        // Plane 1 past the superblocks (all of it for float32): vector v = columns 64v..64v+64.
        for v in n_sb * 8..full {
            prefetch_code(p.codes.as_ptr().wrapping_add(g * kp + 64 * v + AHEAD));
            // SAFETY: 64v + 64 <= kp = base.len().
            let cv = unsafe { _mm512_loadu_si512(base.as_ptr().add(64 * v) as *const _) };
            let sw = scales(v);
            // SAFETY: column 64v + 64 <= kv <= stride (Ctx sizes).
            unsafe { step::<NB, B32, INT8>(cv, 64 * v, &sw, &digit, &pn, &x, &mut acc) };
        }
        if kp % 64 != 0 && 512 * n_sb < kp {
            // The last 32 columns (Kp is a multiple of 32), unless a partial superblock took
            // them: the upper half reads as code 121 (t = 0).
            // SAFETY: only the low 32 bytes are read (mask), and 64 * full + 32 == kp.
            let cv = unsafe {
                _mm512_mask_loadu_epi8(_mm512_set1_epi8(121), 0xFFFF_FFFF, base.as_ptr().add(64 * full) as *const i8)
            };
            let sw = scales(full);
            // SAFETY: column 64 * full + 64 <= kv <= stride.
            unsafe { step::<NB, B32, INT8>(cv, 64 * full, &sw, &digit, &pn, &x, &mut acc) };
        }

        // Plane 2 not done above (all of it for float32; entries past nb of an invalid matrix for
        // int8), entry by entry: entry e
        // holds B code bytes for block p2_block[e] of this group.
        for e in es.start + n_valid..es.end {
            let blk = c.p2_block(e);
            let sw: [(__m512, __m512); R] = core::array::from_fn(|i| {
                let a = _mm512_set1_ps(p.p2_scales[e * R + i] as f32);
                (a, a)
            });
            let codes = &p.p2_codes[e * bs..(e + 1) * bs];
            if B32 {
                // SAFETY: the mask reads codes[0..32] only; column blk * 32 + 64 <= kp + 32 <= stride.
                unsafe {
                    let cv = _mm512_mask_loadu_epi8(_mm512_set1_epi8(121), 0xFFFF_FFFF, codes.as_ptr() as *const i8);
                    step::<NB, false, INT8>(cv, blk * 32, &sw, &digit, &pn, &x, &mut acc);
                }
            } else {
                for u in 0..bs >> 6 {
                    // SAFETY: 64u + 64 <= bs = codes.len(); column blk * bs + 64u + 64 <= kp <= stride.
                    unsafe {
                        let cv = _mm512_loadu_si512(codes.as_ptr().add(64 * u) as *const _);
                        step::<NB, false, INT8>(cv, (blk << lb) + 64 * u, &sw, &digit, &pn, &x, &mut acc);
                    }
                }
            }
        }

        // Reduce, add predators (float32, value * x[col]; or later, `predators_after`), store.
        for i in 0..R {
            let r = g * R + i;
            for b in 0..NB {
                let y = if r >= p.rows {
                    _mm512_reduce_add_ps(acc[i][b])
                } else {
                    let u = row_unit(p.row_scales[r]);
                    match preds {
                        Preds::Skip => _mm512_reduce_add_ps(acc[i][b]) * u,
                        // SAFETY: x.xf[b] holds `stride` floats (Ctx sizes).
                        Preds::Scalar => _mm512_reduce_add_ps(acc[i][b]) * u + super::predators_f32(c, r, unsafe { core::slice::from_raw_parts(x.xf[b], c.x.stride) }),
                        // The row's sum scaled lane-wise, its predators added into the same lanes:
                        // one horizontal sum per row instead of two. SAFETY: as above.
                        Preds::Gather => unsafe { predators_onto(c, r, x.xf[b], _mm512_mul_ps(acc[i][b], _mm512_set1_ps(u))) },
                    }
                };
                out[i * c.batch + b0 + b] = y;
            }
        }
    }
}

/// How `group` adds a matrix's predators at the end of each group (decided once per call).
#[derive(Clone, Copy)]
enum Preds {
    /// Nothing to add there: the matrix has none, or they are added after all the task's
    /// groups (`predators_after`).
    Skip,
    /// At most `SCALAR_PREDATORS` per row on average: scalar loads, inline.
    Scalar,
    /// More: 16-lane gathers (`predators`).
    Gather,
}

impl Preds {
    fn of(c: &Ctx) -> Preds {
        if c.p.out_vals.is_empty() || predators_after(c) {
            Preds::Skip
        } else if few_predators(c) {
            Preds::Scalar
        } else {
            Preds::Gather
        }
    }
}

/// Matrices with at most this many predators per row on average sum them by scalar loads
/// (`predators`).
const SCALAR_PREDATORS: usize = 8;

/// Whether the matrix has at most `SCALAR_PREDATORS` predators per row on average.
#[inline(always)]
fn few_predators(c: &Ctx) -> bool {
    c.p.out_vals.len() <= SCALAR_PREDATORS * c.p.rows
}

/// Sum of `value * x[col]` over the predators of row `r` (float32 products; gathers of x into
/// two accumulators, measured 1.6x faster than scalar loads on Zen 4 for K = 14336's ~110 per
/// row; scalar for at most `SCALAR_PREDATORS` per row on average).
///
/// # Safety
/// `xf` points to `c.x.stride` floats; AVX-512F/BW/VL + F16C present.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(super) unsafe fn predators(c: &Ctx, r: usize, xf: *const f32) -> f32 {
    if few_predators(c) {
        // A few per row on average (SmolLM2-135M at 3 bits: 1-3 per row): one at a time, as
        // the NEON kernels do, costs less than a gather and a horizontal sum.
        // (Decided per matrix, not per row: a branch on each row's count mispredicts often
        // enough to lose it all at ~5 per row.)
        // SAFETY: xf points to c.x.stride floats (this function's contract).
        return super::predators_f32(c, r, unsafe { core::slice::from_raw_parts(xf, c.x.stride) });
    }
    // SAFETY: forwarded.
    unsafe { predators_onto(c, r, xf, _mm512_setzero_ps()) }
}

/// `sum(start) + sum of value * x[col]` over the predators of row `r`, by gathers (the gather
/// path of `predators`; `group` passes a row's scaled accumulator so that one horizontal sum
/// serves both).
///
/// # Safety
/// As for `predators`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn predators_onto(c: &Ctx, r: usize, xf: *const f32, start: __m512) -> f32 {
    let p = c.p;
    let range = c.predators(r);
    let cols = &p.out_cols[range.clone()];
    let vals = &p.out_vals[range];
    let last = _mm512_set1_epi32((c.x.stride - 1) as i32);
    let n = cols.len().min(vals.len());
    let mut s0 = start;
    let mut s1 = _mm512_setzero_ps();
    let mut j = 0;
    // SAFETY: full 16-element loads inside cols/vals (j + 32 <= n), masked ones for the rest;
    // gathered indices are clamped to <= stride - 1, inside xf.
    unsafe {
        while j + 32 <= n {
            let i0 = _mm512_min_epu32(_mm512_loadu_si512(cols.as_ptr().add(j) as *const _), last);
            let i1 = _mm512_min_epu32(_mm512_loadu_si512(cols.as_ptr().add(j + 16) as *const _), last);
            let v0 = _mm512_cvtph_ps(_mm256_loadu_si256(vals.as_ptr().add(j) as *const __m256i));
            let v1 = _mm512_cvtph_ps(_mm256_loadu_si256(vals.as_ptr().add(j + 16) as *const __m256i));
            s0 = _mm512_fmadd_ps(v0, _mm512_i32gather_ps::<4>(i0, xf), s0);
            s1 = _mm512_fmadd_ps(v1, _mm512_i32gather_ps::<4>(i1, xf), s1);
            j += 32;
        }
        while j < n {
            let m: __mmask16 = if n - j >= 16 { 0xFFFF } else { (1u16 << (n - j)) - 1 };
            let i0 = _mm512_min_epu32(_mm512_maskz_loadu_epi32(m, cols.as_ptr().add(j) as *const i32), last);
            let v0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, vals.as_ptr().add(j) as *const i16));
            s0 = _mm512_fmadd_ps(v0, _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, i0, xf), s0);
            j += 16;
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

/// One 64-byte code vector `cv` against columns `col..col + 64` of the tile's activations,
/// accumulated into `acc[row][batch]` with row scales `sw` (first 32 columns, last 32).
///
/// # Safety
/// Columns `col..col + 64` are inside every activation buffer of `x` (`col + 64 <= stride`);
/// the CPU has the features of `group`.
#[inline(always)]
unsafe fn step<const NB: usize, const SPLIT: bool, const INT8: bool>(
    cv: __m512i,
    col: usize,
    sw: &[(__m512, __m512); R],
    digit: &[(__m512i, __m512i); R],
    pn: &[(__m512i, __m512i); 2],
    x: &XPtrs<NB>,
    acc: &mut [[__m512; NB]; R],
) {
    let sv = _mm512_sub_epi8(cv, _mm512_set1_epi8(121));
    let a = _mm512_abs_epi8(sv);
    let m: __mmask64 = _mm512_movepi8_mask(sv);
    if INT8 {
        let dg: [__m512i; R] = core::array::from_fn(|i| _mm512_permutex2var_epi8(digit[i].0, a, digit[i].1));
        let ones = _mm512_set1_epi8(1);
        for b in 0..NB {
            // SAFETY: col + 64 <= stride (contract); sxl holds stride / 4 >= col / 4 + 16.
            let (q, nq, sxv) = unsafe {
                (
                    _mm512_loadu_si512(x.xq[b].add(col) as *const _),
                    _mm512_loadu_si512(x.nxq[b].add(col) as *const _),
                    _mm512_loadu_ps(x.sxl[b].add(col / 4)),
                )
            };
            let xs = _mm512_mask_blend_epi8(m, q, nq);
            let nxs = _mm512_mask_blend_epi8(m, nq, q);
            let corr = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, nxs);
            for i in 0..R {
                let d = _mm512_dpbusd_epi32(corr, dg[i], xs);
                // Lanes 0..8 of the sums are the first 32 columns, lanes 8..16 the last 32.
                let s = if SPLIT { _mm512_mask_blend_ps(0xFF00, sw[i].0, sw[i].1) } else { sw[i].0 };
                acc[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, sxv), acc[i][b]);
            }
        }
    } else {
        let pp = _mm512_permutex2var_epi8(pn[0].0, a, pn[0].1);
        let nn = _mm512_permutex2var_epi8(pn[1].0, a, pn[1].1);
        let pos = _mm512_mask_blend_epi8(m, pp, nn);
        let neg = _mm512_mask_blend_epi8(m, nn, pp);
        let mp: [u64; R] = core::array::from_fn(|i| _mm512_test_epi8_mask(pos, _mm512_set1_epi8(1 << i)));
        let mn: [u64; R] = core::array::from_fn(|i| _mm512_test_epi8_mask(neg, _mm512_set1_epi8(1 << i)));
        for b in 0..NB {
            // SAFETY: col + 64 <= stride (contract).
            let xv: [__m512; 4] = unsafe { core::array::from_fn(|q| _mm512_loadu_ps(x.xf[b].add(col + 16 * q))) };
            for i in 0..R {
                let (p, n) = (mp[i], mn[i]);
                let k = |m: u64, q: usize| (m >> (16 * q)) as __mmask16;
                // Sum of the x where the mask bits are set, quarters q0 and q0 + 1.
                let half = |m: u64, q0: usize| {
                    let t = _mm512_maskz_mov_ps(k(m, q0), xv[q0]);
                    _mm512_mask_add_ps(t, k(m, q0 + 1), t, xv[q0 + 1])
                };
                let (p01, n01) = (half(p, 0), half(n, 0));
                if SPLIT {
                    let (p23, n23) = (half(p, 2), half(n, 2));
                    acc[i][b] = _mm512_fmadd_ps(_mm512_sub_ps(p01, n01), sw[i].0, acc[i][b]);
                    acc[i][b] = _mm512_fmadd_ps(_mm512_sub_ps(p23, n23), sw[i].1, acc[i][b]);
                } else {
                    let pt = _mm512_mask_add_ps(p01, k(p, 2), p01, xv[2]);
                    let pt = _mm512_mask_add_ps(pt, k(p, 3), pt, xv[3]);
                    let nt = _mm512_mask_add_ps(n01, k(n, 2), n01, xv[2]);
                    let nt = _mm512_mask_add_ps(nt, k(n, 3), nt, xv[3]);
                    let t = _mm512_sub_ps(pt, nt);
                    acc[i][b] = _mm512_fmadd_ps(t, sw[i].0, acc[i][b]);
                }
            }
        }
    }
}
