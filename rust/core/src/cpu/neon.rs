//! NEON kernels for aarch64 (ASIMD, which every aarch64 CPU has; int8 uses `sdot` where the CPU
//! has the dot-product extension, ARMv8.2 and later, and widening multiplies otherwise).
//!
//! A 16-byte code vector (16 columns of the group's five rows) is decoded to the ternary codes
//! `t_i = c_i - 1` of every row with one multiply-high split and five table lookups:
//! `b = lo + 9 hi` with `hi = (57 b) >> 9` (exact for every byte 0..=242: `57 / 512` exceeds
//! `1 / 9` by less than `1 / (9 * 255)`, so the floor never moves past a multiple of 9), `lo` in
//! 0..9 holds digits 0 and 1 and `hi` in 0..27 digits 2, 3 and 4; `tbl` over a 9-entry table
//! (rows 0, 1) or a 27-entry one (rows 2..4) gives `t_i` as a signed byte directly (invalid
//! bytes 243..=255 read as ternary zeros, as in the reference). Then per 32 columns (one int8
//! chunk, always inside one block):
//!
//! * int8: `sdot` (or `smull` + `sadalp`) of `t_i` with the int8 activations, converted to
//!   float once per chunk and row and scaled by `block scale * chunk scale`;
//! * float32: `t_i` widened to float, multiplied with `x` and summed, times the block scale.
//!
//! Predators are added per row in float32, like the other kernels.

#![allow(clippy::needless_range_loop)] // index loops over rows / batch vectors read best here

use super::{Activations, Ctx, Scratch, BATCH_TILE};
use crate::format::{MAX_CODE_BYTE, ROWS_PER_GROUP};
use core::arch::aarch64::*;

const R: usize = ROWS_PER_GROUP;

/// Ternary code `t = c - 1` of row `i` for every `lo` (rows 0, 1: `lo = c_0 + 3 c_1`) or `hi`
/// (rows 2..4: `hi = c_2 + 3 c_3 + 9 c_4`); 0 for indices past 9 / 27.
const fn tables() -> [[i8; 32]; R] {
    let mut t = [[0i8; 32]; R];
    let mut b = 0;
    while b < 243 {
        // Digits of b (FORMAT.md: b = sum_i c_i 3^i), as t = c - 1.
        let (lo, hi) = (b % 9, b / 9);
        t[0][lo] = (b % 3) as i8 - 1;
        t[1][lo] = (b / 3 % 3) as i8 - 1;
        t[2][hi] = (b / 9 % 3) as i8 - 1;
        t[3][hi] = (b / 27 % 3) as i8 - 1;
        t[4][hi] = (b / 81) as i8 - 1;
        b += 1;
    }
    t
}
pub(super) const TABLES: [[i8; 32]; R] = tables();

/// The split the kernel uses, for tests: `(lo, hi)` with `hi = (57 b) >> 9`, `lo = b - 9 hi`.
#[cfg(test)]
pub(super) fn split_formula(b: u8) -> (u8, u8) {
    let hi = ((b as u32 * 57) >> 9) as u8;
    (b.wrapping_sub(hi.wrapping_mul(9)), hi)
}

/// Whether the CPU has the dot-product instructions (`sdot`).
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

type GroupFn = unsafe fn(&Ctx, usize, usize, &mut [f32], &mut Scratch);

fn pick<const NB: usize>(act: Activations, dot: bool) -> GroupFn {
    match (act, dot) {
        (Activations::Int8, true) => group_dot::<NB>,
        (Activations::Int8, false) => group::<NB, true>,
        (Activations::F32, _) => group::<NB, false>,
    }
}

fn pick_nb(nb: usize, act: Activations, dot: bool) -> GroupFn {
    match nb {
        1 => pick::<1>(act, dot),
        2 => pick::<2>(act, dot),
        3 => pick::<3>(act, dot),
        4 => pick::<4>(act, dot),
        5 => pick::<5>(act, dot),
        6 => pick::<6>(act, dot),
        7 => pick::<7>(act, dot),
        _ => pick::<8>(act, dot),
    }
}

/// Computes groups `g0..` into `out` ([group][row in group][batch]); `dot`: use `sdot`.
///
/// # Safety
/// `dot` only where [`has_dotprod`]; `c` satisfies the sizes documented on `Ctx`; `scratch` was
/// made by `Scratch::new(&c.d)` (`f` holds >= 5 nb floats).
pub(super) unsafe fn groups(c: &Ctx, g0: usize, out: &mut [f32], scratch: &mut Scratch, dot: bool) {
    let per_group = R * c.batch;
    for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
        let mut b0 = 0;
        while b0 < c.batch {
            let nb = (c.batch - b0).min(BATCH_TILE);
            // SAFETY: forwarded from the caller; the kernel handles exactly `nb` vectors from b0.
            unsafe { pick_nb(nb, c.act, dot)(c, g0 + gi, b0, og, scratch) };
            b0 += nb;
        }
    }
}

/// `acc + sdot(a, b)`: per int32 lane, the sum of its four byte products.
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut r = acc;
    // SAFETY: register-only instruction of the dotprod extension (the caller's contract).
    unsafe { core::arch::asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) r, in(vreg) a, in(vreg) b, options(pure, nomem, nostack, preserves_flags)) };
    r
}

/// The same sums without the extension: widening multiplies, pairwise accumulate. Lane `l`
/// sums the products of columns `2l, 2l + 1, 2l + 8, 2l + 9` (another grouping than `sdot`'s,
/// which only matters for the chunk total the caller takes).
#[inline(always)]
fn sdot_widening(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let p = vmlal_high_s8(lo, a, b);
        vpadalq_s16(acc, p)
    }
}

/// One group for batch vectors `b0..b0 + NB` with `sdot`.
///
/// # Safety
/// As for [`groups`] with `dot`.
#[target_feature(enable = "dotprod")]
unsafe fn group_dot<const NB: usize>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    // SAFETY: forwarded.
    unsafe { group_impl::<NB, true, true>(c, g, b0, out, scratch) }
}

/// One group for batch vectors `b0..b0 + NB` (`INT8`: int8 activations with widening
/// multiplies, else float32).
///
/// # Safety
/// As for [`groups`].
unsafe fn group<const NB: usize, const INT8: bool>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    // SAFETY: forwarded.
    unsafe { group_impl::<NB, INT8, false>(c, g, b0, out, scratch) }
}

/// The kernel of [`group`] and [`group_dot`]: `INT8` int8 activations (else float32), `DOT`
/// with `sdot` (else widening multiplies).
///
/// # Safety
/// As for [`groups`]; `DOT` only inside a function with the dotprod feature on a CPU that has it.
#[inline(always)]
unsafe fn group_impl<const NB: usize, const INT8: bool, const DOT: bool>(c: &Ctx, g: usize, b0: usize, out: &mut [f32], scratch: &mut Scratch) {
    let scr = &mut scratch.f[..];
    let p = c.p;
    let stride = c.x.stride;
    let (xf, xq, sx) = c.x.tile::<NB>(b0, INT8);
    // SAFETY (all intrinsics below): NEON is part of every aarch64 target; `sdot` only when
    // DOT, which only `group_dot` (dotprod enabled, checked by the caller) instantiates.
    let (tlo, thi) = unsafe {
        let t: [int8x16x2_t; R] = core::array::from_fn(|i| int8x16x2_t(vld1q_s8(TABLES[i].as_ptr()), vld1q_s8(TABLES[i].as_ptr().add(16))));
        ([t[0].0, t[1].0], [t[2], t[3], t[4]])
    };
    let mut acc = [[unsafe { vdupq_n_f32(0.0) }; NB]; R];

    // The ternary codes of the five rows for 16 code bytes.
    let decode = |codes: *const u8| -> [int8x16_t; R] {
        // SAFETY: callers pass a pointer to >= 16 readable bytes.
        unsafe {
            let b = vld1q_u8(codes);
            let k57 = vdup_n_u8(57);
            let hi = vshrq_n_u8::<1>(vcombine_u8(vshrn_n_u16::<8>(vmull_u8(vget_low_u8(b), k57)), vshrn_n_u16::<8>(vmull_high_u8(b, vdupq_n_u8(57)))));
            // Invalid bytes (validation rejects them) read as ternary zeros in every row, as
            // in the reference: their `hi` (27, 28) is past the 27 entries, and their `lo` is
            // made 255, past the 9.
            let bad = vcgtq_u8(b, vdupq_n_u8(MAX_CODE_BYTE));
            let lo = vorrq_u8(vmlsq_u8(b, hi, vdupq_n_u8(9)), bad);
            [
                vqtbl1q_s8(tlo[0], lo),
                vqtbl1q_s8(tlo[1], lo),
                vqtbl2q_s8(thi[0], hi),
                vqtbl2q_s8(thi[1], hi),
                vqtbl2q_s8(thi[2], hi),
            ]
        }
    };

    // One 32-byte code piece against columns col..col + 32 (one int8 chunk), row scales `sw`.
    let mut step = |codes: &[u8], col: usize, sw: [f32; R]| {
        debug_assert!(codes.len() >= 32 && col + 32 <= stride);
        let t = [decode(codes.as_ptr()), decode(codes[16..].as_ptr())];
        // SAFETY: col + 32 <= stride = the length of every activation buffer (Ctx contract).
        unsafe {
            if INT8 {
                for b in 0..NB {
                    let s = sx[b][col / 32];
                    let q = [vld1q_s8(xq[b].as_ptr().add(col)), vld1q_s8(xq[b].as_ptr().add(col + 16))];
                    for i in 0..R {
                        let z = vdupq_n_s32(0);
                        let d = if DOT { sdot(sdot(z, t[0][i], q[0]), t[1][i], q[1]) } else { sdot_widening(sdot_widening(z, t[0][i], q[0]), t[1][i], q[1]) };
                        acc[i][b] = vfmaq_n_f32(acc[i][b], vcvtq_f32_s32(d), sw[i] * s);
                    }
                }
            } else {
                // Codes as float, 8 x 4 columns per row, shared by the batch.
                let tf: [[float32x4_t; 8]; R] = core::array::from_fn(|i| {
                    let w = [vmovl_s8(vget_low_s8(t[0][i])), vmovl_high_s8(t[0][i]), vmovl_s8(vget_low_s8(t[1][i])), vmovl_high_s8(t[1][i])];
                    core::array::from_fn(|j| {
                        let h = w[j / 2];
                        vcvtq_f32_s32(if j % 2 == 0 { vmovl_s16(vget_low_s16(h)) } else { vmovl_high_s16(h) })
                    })
                });
                for b in 0..NB {
                    let xv: [float32x4_t; 8] = core::array::from_fn(|j| vld1q_f32(xf[b].as_ptr().add(col + 4 * j)));
                    for i in 0..R {
                        let mut s0 = vmulq_f32(tf[i][0], xv[0]);
                        let mut s1 = vmulq_f32(tf[i][1], xv[1]);
                        for j in (2..8).step_by(2) {
                            s0 = vfmaq_f32(s0, tf[i][j], xv[j]);
                            s1 = vfmaq_f32(s1, tf[i][j + 1], xv[j + 1]);
                        }
                        acc[i][b] = vfmaq_n_f32(acc[i][b], vaddq_f32(s0, s1), sw[i]);
                    }
                }
            }
        }
    };

    super::walk_pieces(c, g, scr, &mut step);

    for i in 0..R {
        let r = g * R + i;
        for b in 0..NB {
            // SAFETY: NEON is part of every aarch64 target.
            let mut y = unsafe { vaddvq_f32(acc[i][b]) };
            if r < p.rows {
                y += super::predators_f32(c, r, xf[b]);
            }
            out[i * c.batch + b0 + b] = y;
        }
    }
}
