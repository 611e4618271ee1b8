//! CPU mat-vec / mat-mat kernels over the packed format (never materialising W).
//!
//! `y = W x` is computed straight from the packed bytes (FORMAT.md): the work is split over
//! row groups (5 rows, one code byte per column), run by the calling thread and helper threads
//! that spin between calls (`team`; the rayon pool when another call holds the team), and
//! inside a group one pass over the columns
//! decodes each code byte once and feeds all five rows (and, in `matmul`, all batch vectors of a
//! tile of up to [`BATCH_TILE`]). The group's plane-2 entries are applied in the same pass over
//! the group (right after its plane-1 codes, while `x` is in L1), and its predators last.
//! docs/kernels.md describes the kernels, the int8 activations and their error bound.
//!
//! Which fast path runs is picked at run time ([`Level::detect`], [`kernel_name`]):
//!
//! * `avx512-vbmi-vnni` (x86-64 with AVX-512 F/BW/VL/VBMI/VNNI, e.g. Zen 4, Ice Lake and later).
//!   int8: 512-column superblocks whose 8 x 64 code bytes are transposed (24 in-register
//!   shuffles) so that each int32 lane of a vector always meets the same 32-column chunk of x;
//!   a 256-entry `vpermi2b` table gives the digits of rows 0..3 packed two bits each, and five
//!   `vpdpbusd` per 64 bytes (digits masked to 2/4/6/8 bits, plus the raw code byte) give the
//!   five rows' sums exactly; one float step per row and superblock. float32: per 64 columns,
//!   the "balanced trick" below and masked adds of x.
//! * `avx2` (x86-64 with AVX2 + FMA + F16C): digits by two 16-bit multiplies per row
//!   (`d = hi16(3 * lo16(byte * ceil(2^16 / 3^(i+1))))`, exact for every byte 0..=242).
//! * `neon-dotprod` / `neon` (aarch64): 16 code bytes split as `b = lo + 9 hi` by one
//!   multiply-high, then one table lookup per row gives its ternary codes as signed bytes; int8
//!   by `sdot` (or widening multiplies without the dot-product extension), float32 by FMA.
//! * `scalar`: the reference kernel ([`scalar`]), float64 accumulation, obviously correct; every
//!   fast path is tested against it.
//!
//! **Balanced trick** (AVX-512 float32 and the int8 tails). A code byte `b` holds digits
//! `c_i = t_i + 1`; `v = b - 121` is then the balanced-ternary number `sum t_i 3^i` in
//! -121..=121, and the digits of `-v` are the negated digits of `v`. So a 128-entry table over
//! `|v|` (one `vpermi2b`, 7-bit index) gives the digits of every row up to the sign of `v`, and
//! that sign (one mask per 64 columns, shared by the five rows) is applied to `x` instead.
//!
//! **int8 activations** ([`Activations::Int8`]): `x` is quantized per 32 columns, symmetric,
//! `s_j = max|x_k| / 127` over the 32 columns `k` of chunk `j`, `q_k = round_half_even(x_k / s_j)`
//! clamped to -127..=127 (a chunk of zeros gets `s_j = 0`, `q = 0`). Then
//! `y_r = sum_planes sum_blocks scale * sum_j s_j * (sum_{k in j} t_rk q_k) + predators`, the inner
//! sums exact in int32 (digits `c = t + 1` are unsigned for `vpdpbusd`:
//! `sum t q = sum c q - sum q`, with `sum q` per chunk computed once per call).
//! Error bound: `|x_k - s_j q_k| <= s_j / 2 = max_j|x| / 254`, hence for every row
//! `|y_r(int8) - y_r(float32)| <= sum_j (max_{k in j}|x_k| / 254) * sum_{k in j} |T_rk|` where
//! `T` is the ternary part of `W` (planes 1 and 2, without predators), plus float32 rounding.
//! For activations without extreme outliers inside a chunk this is about 0.5 % of `||y||`
//! norm-wise (tests hold it to 2 %). Predators always use `x` in float32, exactly
//! (`value * x[col]`). Non-finite `x` in a chunk makes that chunk's scale NaN, so it shows in `y`.

use crate::format::{Dims, PackedMatrix, ROWS_PER_GROUP};
use rayon::prelude::*;
use std::sync::{Arc, RwLock};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

/// Bytes ahead of the current position that the code streams are prefetched by the x86-64
/// kernels (measured: the hardware prefetcher alone loses about half the speed once a matrix
/// falls out of L3).
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 4096;

/// Prefetch with the T1 hint (into L2, not L1) for the streams read once: codes of both planes
/// `AHEAD` bytes on (AVX-512 and AVX2 kernels), and the predator arrays in the AVX-512
/// `add_predators`. Measured (session 9, Python,
/// 2 threads, int8, 3.0 bits, 4096 x 14336, 21-25 rounds alternating in one process, medians):
/// rotating over four matrices (84 MB, past the 32 MiB L3) 1.285 ms with T0 and no predator
/// prefetch, 1.238 with T0 + predators, 1.152 with T1 alone, 1.089 with both (14336 x 4096:
/// 1.760 -> 1.622 for T0 -> T1); one L3-resident matrix 1.007 vs 1.020 (equal within the
/// noise). A T0 line holds one of L1's few miss buffers for its whole trip from memory; T1 lets
/// the L2's deeper queue carry it. 2048 bytes ahead measured worse, 8192 the same.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_code<T>(p: *const T) {
    // SAFETY: PREFETCHT1 is a hint; it cannot fault or change memory, whatever the address.
    unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(p as *const i8) };
}

pub mod scalar;
mod team;
#[cfg(test)]
mod tests;

/// How the activations enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// x used as float32 exactly.
    F32,
    /// x quantized to int8 per 32 columns (symmetric, scale = max|x| / 127); see the module
    /// docs for the exact rule and the error bound.
    Int8,
}

/// Errors of the kernels: only shape mismatches, checked before any work.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
}

/// Columns per int8 quantization chunk of `x` (one scale per chunk).
pub const QUANT_CHUNK: usize = 32;
/// Batch vectors that share one decode of the code bytes in `matmul` (larger batches loop).
pub const BATCH_TILE: usize = 8;

/// A kernel family. [`Level::detect`] picks the fastest one this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Reference kernel, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/VBMI/VNNI (+ FMA, F16C).
    Avx512,
    /// aarch64 NEON (every aarch64 CPU); int8 by widening multiplies.
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`, ARMv8.2+); the float32 path is
    /// [`Level::Neon`]'s.
    NeonDot,
}

impl Level {
    /// All levels, slowest first.
    pub const ALL: [Level; 5] = [Level::Scalar, Level::Avx2, Level::Avx512, Level::Neon, Level::NeonDot];

    /// The name reported by [`kernel_name`].
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512-vbmi-vnni",
            Level::Neon => "neon",
            Level::NeonDot => "neon-dotprod",
        }
    }

    /// Whether this CPU can run the level (run-time detection).
    pub fn supported(self) -> bool {
        match self {
            Level::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => avx2::supported(),
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => avx512::supported(),
            #[cfg(target_arch = "aarch64")]
            Level::Neon => true,
            #[cfg(target_arch = "aarch64")]
            Level::NeonDot => neon::has_dotprod(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The level by its [`name`](Level::name).
    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The fastest supported level, or the one named by the environment variable
    /// `PREDPREY_CPU_KERNEL` when this CPU supports it (to run and compare a slower path, e.g.
    /// `avx2` on an AVX-512 machine); detected once, then cached. [`kernel_name`] says which.
    pub fn detect() -> Level {
        static BEST: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let forced = std::env::var("PREDPREY_CPU_KERNEL").ok().and_then(|v| Level::from_name(v.trim()));
            match forced {
                Some(l) if l.supported() => l,
                _ => Level::ALL.into_iter().rev().find(|l| l.supported()).unwrap_or(Level::Scalar),
            }
        })
    }
}

/// Name of the fast kernel selected on this CPU: "avx512-vbmi-vnni", "avx2", "neon-dotprod",
/// "neon" or "scalar".
pub fn kernel_name() -> &'static str {
    Level::detect().name()
}

/// `y[N] = W x` for `x[K]` (float32), with the fastest kernel this CPU runs.
pub fn matvec(p: &PackedMatrix, x: &[f32], act: Activations, y: &mut [f32]) -> Result<(), KernelError> {
    matmul(p, x, 1, act, y)
}

/// Y[batch, N] = X[batch, K] W^T, both row-major (the nn.Linear convention), with the fastest
/// kernel this CPU runs. Each code byte is decoded once per tile of [`BATCH_TILE`] vectors.
pub fn matmul(p: &PackedMatrix, x: &[f32], batch: usize, act: Activations, y: &mut [f32]) -> Result<(), KernelError> {
    matmul_with(Level::detect(), p, x, batch, act, y)
}

/// [`matmul`] with an explicit kernel family (for tests and benchmarks). A level this CPU does
/// not support falls back to [`Level::Scalar`] (it never runs unsupported instructions).
pub fn matmul_with(
    level: Level,
    p: &PackedMatrix,
    x: &[f32],
    batch: usize,
    act: Activations,
    y: &mut [f32],
) -> Result<(), KernelError> {
    let d = check(p, x, batch, y)?;
    if batch == 0 {
        return Ok(());
    }
    let level = if level.supported() { level } else { Level::Scalar };
    let prep = Prep::new(x, batch, &d, act, level);
    let ctx = Ctx { p, d, act, batch, x: &prep };
    let per_group = ROWS_PER_GROUP * batch;
    let mut tmp = vec![0f32; d.n_groups * per_group];
    let run = |g0: usize, out: &mut [f32]| {
        let mut scratch = Scratch::new(&d);
        match level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `level.supported()` was checked above, so the CPU has every feature the
            // AVX-512 kernels are compiled for; `ctx` was built by `check` + `Prep::new`, which
            // establish the buffer sizes those kernels rely on (see `Ctx`).
            Level::Avx512 => unsafe { avx512::groups(&ctx, g0, out, &mut scratch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for the AVX2 + FMA + F16C features of the AVX2 kernels.
            Level::Avx2 => unsafe { avx2::groups(&ctx, g0, out, &mut scratch) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `ctx` was built by `check` + `Prep::new` (the sizes `Ctx` documents);
            // `sdot` is used only for NeonDot, whose support (dotprod) was checked above.
            Level::Neon | Level::NeonDot => unsafe { neon::groups(&ctx, g0, out, &mut scratch, level == Level::NeonDot) },
            _ => scalar::groups(&ctx, g0, out),
        }
    };
    let work = d.n_groups * d.padded_cols * batch;
    let threads = num_threads().max(1);
    // Small products, and one thread, on the caller: handing the call to the pool costs a
    // wake-up of a worker and then of the caller, ~70 us per call from Python with one worker
    // on this VM (the whole of a 576 x 1536 product is ~35 us).
    if work < (1 << 17) || threads == 1 {
        run(0, &mut tmp);
    } else {
        let tasks = (threads * 8).min(d.n_groups);
        let gpt = d.n_groups.div_ceil(tasks);
        // The caller and spinning helpers (`team`); the pool when another call holds the team.
        let outs: Vec<std::sync::Mutex<&mut [f32]>> = tmp.chunks_mut(gpt * per_group).map(std::sync::Mutex::new).collect();
        let task = |t: usize| run(t * gpt, &mut outs[t].lock().unwrap_or_else(|e| e.into_inner()));
        if !team::run(outs.len(), threads, &task) {
            run_in_pool(|| (0..outs.len()).into_par_iter().for_each(task));
        }
    }
    // tmp is [group][row in group][batch]; y is [batch][row].
    for (b, yb) in y.chunks_exact_mut(p.rows).enumerate() {
        for (r, v) in yb.iter_mut().enumerate() {
            *v = tmp[r * batch + b];
        }
    }
    Ok(())
}

/// Checks shapes and the array lengths the kernels index by; everything else that `validate`
/// checks (pointer monotonicity, block/column ranges) is clamped inside the kernels, so an
/// invalid matrix gives wrong numbers, never a panic or an out-of-bounds access.
fn check(p: &PackedMatrix, x: &[f32], batch: usize, y: &[f32]) -> Result<Dims, KernelError> {
    let d = Dims::new(p.rows, p.cols, p.block_size).map_err(|e| KernelError::Shape(e.to_string()))?;
    let want_x = batch.checked_mul(p.cols);
    let want_y = batch.checked_mul(p.rows);
    if want_x != Some(x.len()) || want_y != Some(y.len()) {
        return Err(KernelError::Shape(format!(
            "x has {} values and y {}; expected batch * K = {batch} * {} and batch * N = {batch} * {} (the matrix is {}x{})",
            x.len(), y.len(), p.cols, p.rows, p.rows, p.cols
        )));
    }
    let e = p.p2_block.len();
    let m = p.out_vals.len();
    let lens = [
        ("codes", p.codes.len(), d.n_groups * d.padded_cols),
        ("scales", p.scales.len(), p.rows * d.n_blocks),
        ("row_scales", p.row_scales.len(), p.rows),
        ("p2_ptr", p.p2_ptr.len(), d.n_groups + 1),
        ("p2_scales", p.p2_scales.len(), e * ROWS_PER_GROUP),
        ("p2_codes", p.p2_codes.len(), e * d.block_size),
        ("out_ptr", p.out_ptr.len(), p.rows + 1),
        ("out_cols", p.out_cols.len(), m),
    ];
    for (name, got, want) in lens {
        if got != want {
            return Err(KernelError::Shape(format!(
                "packed matrix array `{name}` has {got} elements; expected {want} (the matrix does not validate)"
            )));
        }
    }
    if batch > 0 && (p.cols as u64) >= (i32::MAX as u64) / 2 {
        return Err(KernelError::Shape(format!("K = {} is too wide for the kernels (at most 2^30)", p.cols)));
    }
    Ok(d)
}

/// Per-task scratch of the fast kernels: `f`, room for two [5][nb + 16] tables of one group's
/// scales as f32 (AVX-512 uses one, AVX2 [5][nb]) plus slack.
pub(crate) struct Scratch {
    pub f: Vec<f32>,
}

impl Scratch {
    pub fn new(d: &Dims) -> Scratch {
        Scratch { f: vec![0.0; 2 * ROWS_PER_GROUP * (d.n_blocks + 16) + 64] }
    }
}

/// Everything a kernel reads, with the sizes it relies on:
/// * `p` passed `check` (array lengths as in FORMAT.md for `d`);
/// * `x.xf[b]` (and, for int8, `x.xq[b]`; for int8 on AVX-512 also `x.nxq[b]`) hold
///   `x.stride >= kv + 64` values, where `kv` is `padded_cols` rounded up to 64, zero past K;
///   `x.sx[b]` holds `stride / 32` values and (int8 on AVX-512) `x.sxl[b]` `stride / 4`.
pub(crate) struct Ctx<'a> {
    pub p: &'a PackedMatrix,
    pub d: Dims,
    pub act: Activations,
    pub batch: usize,
    pub x: &'a Prep,
}

impl Ctx<'_> {
    /// Predator range of row `r`, clamped into `0..M` (valid matrices need no clamping).
    #[inline]
    pub fn predators(&self, r: usize) -> std::ops::Range<usize> {
        let m = self.p.out_vals.len();
        let s = (self.p.out_ptr[r] as usize).min(m);
        let t = (self.p.out_ptr[r + 1] as usize).min(m).max(s);
        s..t
    }

    /// Plane-2 entry range of group `g`, clamped into `0..E`.
    #[inline]
    pub fn p2_entries(&self, g: usize) -> std::ops::Range<usize> {
        let e = self.p.p2_block.len();
        let s = (self.p.p2_ptr[g] as usize).min(e);
        let t = (self.p.p2_ptr[g + 1] as usize).min(e).max(s);
        s..t
    }

    /// Block of plane-2 entry `e`, clamped to `< nb`.
    #[inline]
    pub fn p2_block(&self, e: usize) -> usize {
        (self.p.p2_block[e] as usize).min(self.d.n_blocks - 1)
    }
}

/// The walk of the 32-column kernels (AVX2, NEON) over group `g`: every 32 code bytes of its
/// plane-1 codes, then of its plane-2 entries, as `step(codes, first column, row scales)` (32
/// columns always lie in one block, B >= 32). Fills `scr[i * nb + blk]` with the plane-1 block
/// scales of row `i` (0 for padding rows) first; `scr` holds >= 5 nb floats.
#[inline(always)]
pub(crate) fn walk_pieces(c: &Ctx, g: usize, scr: &mut [f32], mut step: impl FnMut(&[u8], usize, [f32; ROWS_PER_GROUP])) {
    const R: usize = ROWS_PER_GROUP;
    let p = c.p;
    let (bs, kp, nb) = (c.d.block_size, c.d.padded_cols, c.d.n_blocks);
    for i in 0..R {
        let r = g * R + i;
        let dst = &mut scr[i * nb..(i + 1) * nb];
        if r >= p.rows {
            dst.fill(0.0);
            continue;
        }
        let u = p.row_scales[r];
        for (d, &q) in dst.iter_mut().zip(&p.scales[r * nb..(r + 1) * nb]) {
            *d = crate::format::scale_value(q, u);
        }
    }
    let codes = &p.codes[g * kp..(g + 1) * kp];
    for v in 0..kp / 32 {
        let blk = v * 32 / bs;
        let sw: [f32; R] = core::array::from_fn(|i| scr[i * nb + blk]);
        step(&codes[32 * v..32 * v + 32], 32 * v, sw);
    }
    for e in c.p2_entries(g) {
        let blk = c.p2_block(e);
        let sw: [f32; R] = core::array::from_fn(|i| if g * R + i < p.rows { p.p2_scale(e, g * R + i) } else { 0.0 });
        let pc = &p.p2_codes[e * bs..(e + 1) * bs];
        for u in 0..bs / 32 {
            step(&pc[32 * u..32 * u + 32], blk * bs + 32 * u, sw);
        }
    }
}

/// Sum of `value * x[col]` over the predators of row `r`, in float32, one at a time (invalid
/// columns read 0): the predator pass of the NEON kernels, and of the AVX-512 ones for
/// matrices with few predators per row.
#[inline(always)]
pub(crate) fn predators_f32(c: &Ctx, r: usize, xf: &[f32]) -> f32 {
    let p = c.p;
    let range = c.predators(r);
    let (cols, vals) = (&p.out_cols[range.clone()], &p.out_vals[range]);
    let mut sum = 0f32;
    for (&col, v) in cols.iter().zip(vals) {
        sum += v.to_f32() * xf.get(col as usize).copied().unwrap_or(0.0);
    }
    sum
}

/// 512-column superblocks the AVX-512 int8 kernel runs over a padded width `kp`: the whole
/// ones, plus the last, partial one (zero codes and zero `x` past `kp`) when it holds at least 6
/// of its 8 code vectors; fewer go through 64-column steps, each with its own float step. (A
/// K = 960 product's 7 such vectors cost ~1.8x a whole superblock; at 3.0 bits, 1535 rows, one
/// thread: K = 960 71.0 -> 67.5 us, 896 65.8 -> 64.7; with 5 and 4 vectors it measured 1-5 %
/// slower, so those keep the steps.)
pub(crate) const fn int8_superblocks(kp: usize) -> usize {
    kp / 512 + ((kp % 512).div_ceil(64) >= 6) as usize
}

/// The 32-column chunk (0..16) that dword lane `l` of the AVX-512 superblock layout covers:
/// lane `l = 4 m + j` holds source vector `4 (m / 2) + j`, half `m % 2` (see `avx512::transpose8`).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const fn lane_chunk(l: usize) -> usize {
    let (m, j) = (l / 4, l % 4);
    2 * (4 * (m / 2) + j) + m % 2
}

/// The activations, padded and (for int8) quantized once per call.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Prep {
    /// Values per batch vector in `xf`, `xq`, `nxq`: a multiple of 64, at least `kv + 64`.
    pub stride: usize,
    /// x as float32, [batch][stride], zero past K.
    pub xf: Vec<f32>,
    /// Quantized x, [batch][stride] (int8 only, else empty).
    pub xq: Vec<i8>,
    /// -xq (int8 + AVX-512 only: the 64-column steps past the superblocks read it).
    pub nxq: Vec<i8>,
    /// Chunk scales s_j, [batch][stride / 32] (int8 only).
    pub sx: Vec<f32>,
    /// s_j repeated for each 4-column lane of its chunk, [batch][stride / 4] (int8 + AVX-512
    /// only, like `nxq`).
    pub sxl: Vec<f32>,
    /// xq in the superblock layout of the AVX-512 kernel (int8 + AVX-512 only, else empty):
    /// for superblock `sb` (columns 512 sb..), vector `v` (0..8), lane `L` (0..16), byte `j`:
    /// `xt[512 sb + 64 v + 4 L + j] = xq[512 sb + 32 lane_chunk(L) + 4 v + j]`, so lane `L` of
    /// all 8 vectors covers chunk `lane_chunk(L)` of the superblock. [batch][stride].
    pub xt: Vec<i8>,
    /// Chunk scales in the same lane order: `sxt[16 sb + L] = sx[16 sb + lane_chunk(L)]`.
    pub sxt: Vec<f32>,
    /// Chunk sums `sum_{k in chunk j} xq_k`, [batch][stride / 32] (int8 + AVX-512 only).
    pub qsum: Vec<i32>,
    /// The same in the lane order of `xt`: `qsumt[16 sb + L] = qsum[16 sb + lane_chunk(L)]`.
    pub qsumt: Vec<i32>,
    /// Bytes per batch vector of `xt256`: `padded_cols` rounded up to 256 (int8 + AVX2 only).
    pub st256: usize,
    /// xq in the 256-column superblock layout of the AVX2 int8 kernel (int8 + AVX2 only): for
    /// superblock `sb`, vector `v` (0..8), dword lane `L` (0..8), byte `j`:
    /// `xt256[256 sb + 32 v + 4 L + j] = xq[256 sb + 32 L + 4 v + j]` (zero past `padded_cols`),
    /// so lane `L` of all 8 vectors covers chunk `8 sb + L`. [batch][st256].
    pub xt256: Vec<i8>,
    /// Chunk sums `sum_{k in chunk j} xq_k` and chunk scales `s_j`, both [batch][st256 / 32],
    /// zero past `padded_cols` (int8 + AVX2 only).
    pub qsum256: Vec<i32>,
    pub sx256: Vec<f32>,
}

impl Prep {
    fn new(x: &[f32], batch: usize, d: &Dims, act: Activations, level: Level) -> Prep {
        let k = d.cols;
        // int8: room for the AVX-512 kernel's last, partial superblock (`int8_superblocks`);
        // the same stride on every level, so the preparations compare value for value.
        let sb_cols = if act == Activations::Int8 { 512 * int8_superblocks(d.padded_cols) } else { 0 };
        let stride = (d.padded_cols.div_ceil(64) * 64 + 64).max(sb_cols);
        let avx512 = cfg!(target_arch = "x86_64") && act == Activations::Int8 && level == Level::Avx512 && level.supported();
        let mut xf = vec![0f32; batch * stride];
        for (dst, src) in xf.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let (mut xq, mut nxq, mut sx, mut sxl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut xt, mut sxt, mut qsum, mut qsumt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut st256, mut xt256, mut qsum256, mut sx256) = (0, Vec::new(), Vec::new(), Vec::new());
        if act == Activations::Int8 {
            let nc = stride / QUANT_CHUNK;
            xq = vec![0i8; batch * stride];
            sx = vec![0f32; batch * nc];
            // The AVX-512 kernel also reads the superblock layout, which its preparation writes.
            if avx512 {
                (xt, sxt, qsum, qsumt) = (vec![0i8; batch * stride], vec![0f32; batch * nc], vec![0i32; batch * nc], vec![0i32; batch * nc]);
            }
            if cfg!(target_arch = "x86_64") && level == Level::Avx2 && level.supported() {
                st256 = d.padded_cols.div_ceil(256) * 256;
                let nc256 = st256 / QUANT_CHUNK;
                (xt256, qsum256, sx256) = (vec![0i8; batch * st256], vec![0i32; batch * nc256], vec![0f32; batch * nc256]);
            }
            for b in 0..batch {
                let (v, c) = (b * stride..(b + 1) * stride, b * nc..(b + 1) * nc);
                let (xs, qs, ss) = (&xf[v.clone()], &mut xq[v.clone()], &mut sx[c.clone()]);
                #[cfg(target_arch = "x86_64")]
                match level {
                    // SAFETY: the CPU has AVX-512 (checked above); the slices have the lengths
                    // `prep_int8` asks for (stride a multiple of 64, >= 512 int8_superblocks).
                    Level::Avx512 if avx512 => unsafe {
                        avx512::prep_int8(xs, qs, ss, &mut qsum[c.clone()], &mut xt[v], &mut sxt[c.clone()], &mut qsumt[c], int8_superblocks(d.padded_cols));
                        continue;
                    },
                    // SAFETY: the CPU has AVX2 + FMA + F16C (checked here); stride = 32 * nc.
                    Level::Avx2 if level.supported() => unsafe {
                        avx2::quantize_x(xs, qs, ss);
                        let nc256 = st256 / QUANT_CHUNK;
                        let (t, c) = (b * st256..(b + 1) * st256, b * nc256..(b + 1) * nc256);
                        avx2::prep_int8(qs, ss, &mut xt256[t], &mut qsum256[c.clone()], &mut sx256[c], d.padded_cols);
                        continue;
                    },
                    _ => {}
                }
                for ((ch, q), s) in xs.chunks_exact(QUANT_CHUNK).zip(qs.chunks_exact_mut(QUANT_CHUNK)).zip(ss.iter_mut()) {
                    *s = quantize_chunk(ch, q);
                }
            }
            if avx512 {
                nxq = xq.iter().map(|&q| -q).collect();
                sxl = sx.iter().flat_map(|&s| [s; QUANT_CHUNK / 4]).collect();
            }
        }
        Prep { stride, xf, xq, nxq, sx, sxl, xt, sxt, qsum, qsumt, st256, xt256, qsum256, sx256 }
    }
    /// Padded float32 x of batch vector `b`.
    #[inline]
    pub fn xf(&self, b: usize) -> &[f32] {
        &self.xf[b * self.stride..(b + 1) * self.stride]
    }
    /// Quantized x of batch vector `b`.
    #[inline]
    pub fn xq(&self, b: usize) -> &[i8] {
        &self.xq[b * self.stride..(b + 1) * self.stride]
    }
    /// Chunk scales of batch vector `b`.
    #[inline]
    pub fn sx(&self, b: usize) -> &[f32] {
        let n = self.stride / QUANT_CHUNK;
        &self.sx[b * n..(b + 1) * n]
    }
    /// The activations of batch vectors `b0..b0 + NB` as the 32-column kernels (AVX2, NEON)
    /// read them: float32, and for `int8` the quantized codes and chunk scales (else empty).
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    pub fn tile<const NB: usize>(&self, b0: usize, int8: bool) -> ([&[f32]; NB], [&[i8]; NB], [&[f32]; NB]) {
        (
            core::array::from_fn(|b| self.xf(b0 + b)),
            core::array::from_fn(|b| if int8 { self.xq(b0 + b) } else { &[][..] }),
            core::array::from_fn(|b| if int8 { self.sx(b0 + b) } else { &[][..] }),
        )
    }
}

/// Quantizes one chunk of x to int8 (symmetric, scale = max|x| / 127, round half to even,
/// clamped to -127..=127) and returns the scale. A chunk with a non-finite value gets scale NaN
/// (so it poisons y the way float arithmetic would); an all-zero chunk gets scale 0.
pub fn quantize_chunk(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if x.iter().any(|v| !v.is_finite()) {
        q.fill(0);
        return f32::NAN;
    }
    let s = amax / 127.0;
    if s == 0.0 {
        q.fill(0);
        return 0.0;
    }
    // Round half to even by the 1.5 * 2^23 trick (exact for |v / s| < 2^22, here <= ~127;
    // unlike `round_ties_even` it needs no SSE4.1, so it vectorizes on baseline x86-64).
    const MAGIC: f32 = 12_582_912.0;
    for (q, v) in q.iter_mut().zip(x) {
        let r = ((v / s) + MAGIC) - MAGIC;
        *q = r.clamp(-127.0, 127.0) as i8;
    }
    s
}

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn all_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Sets the worker count for kernels and the quantizer (0 = all cores). Builds and caches one
/// rayon pool; calling again with the same count keeps it.
pub fn set_num_threads(n: usize) -> Result<(), KernelError> {
    const MAX_THREADS: usize = 1024;
    let n = if n == 0 { all_cores() } else { n };
    if n > MAX_THREADS {
        return Err(KernelError::Shape(format!("{n} threads requested; at most {MAX_THREADS}")));
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if slot.as_ref().is_some_and(|p| p.current_num_threads() == n) {
        return Ok(());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("predprey-{i}"))
        .build()
        .map_err(|e| KernelError::Shape(format!("could not start {n} worker threads: {e}")))?;
    *slot = Some(Arc::new(pool));
    Ok(())
}

/// The shared worker pool, created with all cores on first use. `None` only if no worker
/// thread could be started at all (then work runs on rayon's global pool).
pub fn pool() -> Option<Arc<rayon::ThreadPool>> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return Some(p.clone());
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        *slot = rayon::ThreadPoolBuilder::new()
            .num_threads(all_cores())
            .thread_name(|i| format!("predprey-{i}"))
            .build()
            .ok()
            .map(Arc::new);
    }
    slot.clone()
}

/// Runs `f` inside the shared pool (so rayon calls in `f` use [`num_threads`] workers). Use
/// this from the quantizer and any other parallel code of the crate.
pub fn run_in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Worker count in use.
pub fn num_threads() -> usize {
    match pool() {
        Some(p) => p.current_num_threads(),
        None => rayon::current_num_threads(),
    }
}
