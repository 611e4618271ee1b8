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

use super::{Activations, Ctx, BATCH_TILE};
use crate::format::ROWS_PER_GROUP;
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
        }
    }
}

type GroupFn = unsafe fn(&Ctx, usize, usize, &mut [f32], &mut [f32]);

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
/// `scratch` holds at least `5 * (nb + 1) + 16` floats.
pub(super) unsafe fn groups(c: &Ctx, g0: usize, out: &mut [f32], scratch: &mut [f32]) {
    let per_group = R * c.batch;
    let b32 = c.d.block_size == 32;
    for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
        let mut b0 = 0;
        while b0 < c.batch {
            let nb = (c.batch - b0).min(BATCH_TILE);
            let f = pick_nb(nb, c.act, b32);
            // SAFETY: forwarded from the caller; `f` is `group` for exactly `nb` vectors from b0.
            unsafe { f(c, g0 + gi, b0, og, scratch) };
            b0 += nb;
        }
    }
}

/// Converts the plane-1 scales of the 5 rows of group `g` to f32 into `scr`, row i at
/// `i * (nb + 1)`, with a 0 after each row (read by the half vector past the last block when
/// B = 32) and 0 for padding rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn row_scales(c: &Ctx, g: usize, scr: &mut [f32]) {
    let nb = c.d.n_blocks;
    for i in 0..R {
        let r = g * R + i;
        let dst = &mut scr[i * (nb + 1)..(i + 1) * (nb + 1)];
        if r >= c.p.rows {
            dst.fill(0.0);
            continue;
        }
        let src = &c.p.scales[r * nb..(r + 1) * nb];
        let mut k = 0;
        while k < nb {
            let n = (nb - k).min(16);
            let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
            // SAFETY: `src[k..k + n]` and `dst[k..k + n]` are in bounds (n <= nb - k); lanes
            // past n are masked off, so neither access touches memory outside them. f16 is a
            // transparent u16, so the i16 pointer reads its bits.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(m, src.as_ptr().add(k) as *const i16);
                _mm512_mask_storeu_ps(dst.as_mut_ptr().add(k), m, _mm512_cvtph_ps(h));
            }
            k += n;
        }
        dst[nb] = 0.0;
    }
}

/// One group for batch vectors `b0..b0 + NB`. `B32`: block size 32 (a 64-column vector spans
/// two blocks). `INT8`: int8 activations, else float32.
///
/// # Safety
/// As for [`groups`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni,fma,f16c")]
unsafe fn group<const NB: usize, const B32: bool, const INT8: bool>(
    c: &Ctx,
    g: usize,
    b0: usize,
    out: &mut [f32],
    scr: &mut [f32],
) {
    let p = c.p;
    let (bs, kp, nb) = (c.d.block_size, c.d.padded_cols, c.d.n_blocks);
    // SAFETY: scratch size and CPU features per this function's contract.
    unsafe { row_scales(c, g, scr) };
    let x = XPtrs::<NB>::new(c, b0);
    // SAFETY: the tables are 128 bytes each (AVX-512F present).
    let digit = unsafe { [0, 1, 2, 3, 4].map(|i| lut_regs(&DIGIT_LUTS[i])) };
    let pn = unsafe { [lut_regs(&POS_LUT), lut_regs(&NEG_LUT)] };
    let mut acc = [[_mm512_setzero_ps(); NB]; R];
    let row_stride = nb + 1;

    // The row scales of the 64-column vector `v`: (lanes/quarters of the first 32 columns,
    // of the last 32); equal unless B = 32.
    let scales = |v: usize| -> [(__m512, __m512); R] {
        core::array::from_fn(|i| {
            let s = &scr[i * row_stride..(i + 1) * row_stride];
            if B32 {
                (_mm512_set1_ps(s[2 * v]), _mm512_set1_ps(s[2 * v + 1]))
            } else {
                let a = _mm512_set1_ps(s[v * 64 / bs]);
                (a, a)
            }
        })
    };

    // Plane 1: G codes rows of Kp bytes; vector v covers columns 64v..64v+64.
    let base = &p.codes[g * kp..(g + 1) * kp];
    let full = kp / 64;
    for v in 0..full {
        // SAFETY: 64v + 64 <= kp = base.len().
        let cv = unsafe { _mm512_loadu_si512(base.as_ptr().add(64 * v) as *const _) };
        let sw = scales(v);
        // SAFETY: column 64v + 64 <= kv <= stride (Ctx sizes).
        unsafe { step::<NB, B32, INT8>(cv, 64 * v, &sw, &digit, &pn, &x, &mut acc) };
    }
    if kp % 64 != 0 {
        // The last 32 columns (Kp is a multiple of 32): the upper half reads as code 121 (t = 0).
        // SAFETY: only the low 32 bytes are read (mask), and 64 * full + 32 == kp.
        let cv = unsafe {
            _mm512_mask_loadu_epi8(_mm512_set1_epi8(121), 0xFFFF_FFFF, base.as_ptr().add(64 * full) as *const i8)
        };
        let sw = scales(full);
        // SAFETY: column 64 * full + 64 <= kv <= stride.
        unsafe { step::<NB, B32, INT8>(cv, 64 * full, &sw, &digit, &pn, &x, &mut acc) };
    }

    // Plane 2: entry e holds B code bytes for block p2_block[e] of this group.
    for e in c.p2_entries(g) {
        let blk = c.p2_block(e);
        let s2: [f32; R] = core::array::from_fn(|i| p.p2_scales[e * R + i].to_f32());
        let sw: [(__m512, __m512); R] = core::array::from_fn(|i| {
            let a = _mm512_set1_ps(s2[i]);
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
            for u in 0..bs / 64 {
                // SAFETY: 64u + 64 <= bs = codes.len(); column blk * bs + 64u + 64 <= kp <= stride.
                unsafe {
                    let cv = _mm512_loadu_si512(codes.as_ptr().add(64 * u) as *const _);
                    step::<NB, false, INT8>(cv, blk * bs + 64 * u, &sw, &digit, &pn, &x, &mut acc);
                }
            }
        }
    }

    // Reduce, add predators (float32, value * x[col]), store.
    for i in 0..R {
        let r = g * R + i;
        for b in 0..NB {
            let mut y = _mm512_reduce_add_ps(acc[i][b]);
            if r < p.rows {
                // SAFETY: x.xf[b] holds `stride` floats (Ctx sizes).
                y += unsafe { predators(c, r, x.xf[b]) };
            }
            out[i * c.batch + b0 + b] = y;
        }
    }
}

/// Sum of `value * x[col]` over the predators of row `r`.
///
/// # Safety
/// `xf` points to `c.x.stride` floats; AVX-512F + F16C present.
#[inline(always)]
unsafe fn predators(c: &Ctx, r: usize, xf: *const f32) -> f32 {
    let p = c.p;
    let range = c.predators(r);
    let cols = &p.out_cols[range.clone()];
    let vals = &p.out_vals[range];
    // An invalid column reads x[stride - 1] (always 0) instead of out of bounds.
    let last = _mm512_set1_epi32((c.x.stride - 1) as i32);
    let mut sum = _mm512_setzero_ps();
    let mut j = 0;
    while j < cols.len() {
        let n = (cols.len() - j).min(16);
        let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
        // SAFETY: lanes past n are masked off, so the loads touch only cols[j..j + n] and
        // vals[j..j + n]; every gathered index is clamped to <= stride - 1, inside xf.
        unsafe {
            let idx = _mm512_min_epu32(_mm512_maskz_loadu_epi32(m, cols.as_ptr().add(j) as *const i32), last);
            let v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, vals.as_ptr().add(j) as *const i16));
            let xv = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), m, idx, xf);
            sum = _mm512_fmadd_ps(v, xv, sum);
        }
        j += n;
    }
    _mm512_reduce_add_ps(sum)
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
