//! The scalar reference kernel: straight from FORMAT.md, float64 accumulation, one weight at a
//! time. Every fast path is tested against it; it is also the kernel of CPUs without SIMD.

use super::{Activations, Ctx, QUANT_CHUNK};
use crate::format::{DIGITS, ROWS_PER_GROUP};

/// Computes the groups `g0..` whose outputs `out` holds, laid out [group][row in group][batch].
pub(crate) fn groups(c: &Ctx, g0: usize, out: &mut [f32]) {
    let per_group = ROWS_PER_GROUP * c.batch;
    for (gi, og) in out.chunks_exact_mut(per_group).enumerate() {
        let g = g0 + gi;
        for i in 0..ROWS_PER_GROUP {
            let r = g * ROWS_PER_GROUP + i;
            for b in 0..c.batch {
                og[i * c.batch + b] = if r < c.p.rows { row(c, r, b) as f32 } else { 0.0 };
            }
        }
    }
}

/// Ternary code (-1, 0, +1) of row `i` of a group in code byte `byte`.
#[inline]
fn t(byte: u8, i: usize) -> i32 {
    DIGITS[byte as usize][i] as i32 - 1
}

/// `sum_k t_ik x_k` over one block's code `bytes` (first column `k0`, a multiple of 32) for
/// row `i` of the group and batch vector `b`, with the int8 activations: per 32-column chunk
/// an exact integer dot times the chunk scale, in float64.
pub(crate) fn block_int8(c: &Ctx, i: usize, b: usize, bytes: &[u8], k0: usize) -> f64 {
    let (xq, sx) = (c.x.xq(b), c.x.sx(b));
    let mut sum = 0f64;
    for (j, chunk) in bytes.chunks(QUANT_CHUNK).enumerate() {
        let k = k0 + j * QUANT_CHUNK;
        let dot: i32 = chunk.iter().enumerate().map(|(kk, &byte)| t(byte, i) * xq[k + kk] as i32).sum();
        sum += sx[k / QUANT_CHUNK] as f64 * dot as f64;
    }
    sum
}

/// y_r for batch vector `b`, in float64.
pub(crate) fn row(c: &Ctx, r: usize, b: usize) -> f64 {
    let p = c.p;
    let (bs, kp, nb) = (c.d.block_size, c.d.padded_cols, c.d.n_blocks);
    let (g, i) = (r / ROWS_PER_GROUP, r % ROWS_PER_GROUP);
    let xf = c.x.xf(b);
    let codes = &p.codes[g * kp..(g + 1) * kp];
    let mut acc = 0f64;
    // One block of codes (`bytes`, starting at column `k0`) with scale `s`.
    let block = |bytes: &[u8], k0: usize, s: f64| -> f64 {
        match c.act {
            Activations::F32 => {
                s * bytes.iter().enumerate().map(|(kk, &byte)| t(byte, i) as f64 * xf[k0 + kk] as f64).sum::<f64>()
            }
            Activations::Int8 => s * block_int8(c, i, b, bytes, k0),
        }
    };
    for blk in 0..nb {
        let s = p.scale(r, blk) as f64;
        acc += block(&codes[blk * bs..(blk + 1) * bs], blk * bs, s);
    }
    for e in c.p2_entries(g) {
        let blk = c.p2_block(e);
        let s = p.p2_scale(e, r) as f64;
        acc += block(&p.p2_codes[e * bs..(e + 1) * bs], blk * bs, s);
    }
    for j in c.predators(r) {
        let x = xf.get(p.out_cols[j] as usize).copied().unwrap_or(0.0);
        acc += (p.out_vals[j].to_f32() * x) as f64;
    }
    acc
}
