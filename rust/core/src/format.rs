//! The packed format: its one definition (layout, validation, (de)serialisation).
//!
//! FORMAT.md in the repository root is the written spec of exactly this module. Every kernel
//! (CPU here, WGSL in `shaders/`) and the Python side follow it.

use half::f16;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

/// Version of the layout written by this crate. Files with another version are rejected.
pub const FORMAT_VERSION: u32 = 2;
/// Rows packed together: one byte holds one code of each of the 5 rows of a group (base 3).
pub const ROWS_PER_GROUP: usize = 5;
/// Allowed block sizes (weights per block along K).
pub const BLOCK_SIZES: [usize; 4] = [32, 64, 128, 256];
/// Largest valid code byte (3^5 - 1).
pub const MAX_CODE_BYTE: u8 = 242;
/// The code byte whose five digits are all 1, i.e. five ternary zeros (padding value).
pub const ZERO_CODE_BYTE: u8 = 121;
/// Powers of three: digit `i` of a code byte has weight `POW3[i]`.
pub const POW3: [u8; 5] = [1, 3, 9, 27, 81];
/// Widest K for which predator columns are stored as u16.
pub const MAX_K_U16_COLS: usize = 65536;
/// The tensor names, in file order.
pub const TENSOR_NAMES: [&str; 10] = [
    "codes", "scales", "row_scales", "p2_ptr", "p2_block", "p2_scales", "p2_codes", "out_ptr",
    "out_cols", "out_vals",
];
/// Rejects any array name that is not one of `TENSOR_NAMES` (a file or a set of arrays holds
/// those ten only; a stray name is most likely a misspelt one). The first in sorted order is
/// named, so the message does not depend on the order the names come in.
pub fn check_array_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), FormatError> {
    match names.into_iter().filter(|n| !TENSOR_NAMES.contains(n)).min() {
        Some(n) => invalid(format!("unexpected array `{n}`; a predprey matrix holds only {TENSOR_NAMES:?}")),
        None => Ok(()),
    }
}
/// Largest 8-bit block-scale code.
pub const MAX_SCALE_CODE: u8 = 255;
/// A block scale is `row_scales[r] * code / SCALE_DIV` (a power of two, so the factor
/// `row_scales[r] / SCALE_DIV` is exact in float32).
pub const SCALE_DIV: f32 = 256.0;

/// The FP16 row scale `u` for a row whose largest block scale (either plane) is `max_abs`:
/// the FP16 value nearest `max_abs * 256 / 255` (one step above it where that would put the
/// largest scale past code 255.5, which only a coarse subnormal `u` can), so every block scale
/// of the row rounds to its nearest code in 0..=255, the largest to about 255. 0 for a row of
/// zero scales; capped at 65504 (larger scales then clamp to code 255). `max_abs` must be
/// finite and >= 0.
pub fn row_scale_for(max_abs: f32) -> f16 {
    if max_abs <= 0.0 || max_abs.is_nan() {
        return f16::ZERO;
    }
    let mut u = f16::from_f32((max_abs * (SCALE_DIV / MAX_SCALE_CODE as f32)).min(65504.0));
    // Rounded down so far (a subnormal u is coarse) that the largest scale would clamp at 255:
    // one FP16 step up, so it rounds to its nearest code like every other scale.
    while !fits_row_scale(max_abs, u) && u < f16::MAX {
        u = f16::from_bits(u.to_bits() + 1);
    }
    u
}

/// Whether a row whose largest block scale is `max_abs` fits under row scale `u`: its largest
/// scale rounds to a code <= 255 (`max_abs * 256 / u <= 255.5`), nothing clamps.
pub fn fits_row_scale(max_abs: f32, u: f16) -> bool {
    max_abs * SCALE_DIV <= (MAX_SCALE_CODE as f32 + 0.5) * u.to_f32()
}

/// The unit of row scale `u`: `u / 256` as float32 (exact), what one step of a scale code is
/// worth. A block scale is `row_unit(u) * code` (`scale_value`).
#[inline]
pub fn row_unit(u: f16) -> f32 {
    u.to_f32() * (1.0 / SCALE_DIV)
}

/// The 8-bit code of block scale `s` (>= 0) under row scale `u`: round(s * 256 / u), clamped
/// to 0..=255 (0 when `u` is 0).
pub fn scale_code(s: f32, u: f16) -> u8 {
    let u = u.to_f32();
    if u <= 0.0 || !u.is_finite() {
        return 0;
    }
    (s * SCALE_DIV / u).round().clamp(0.0, MAX_SCALE_CODE as f32) as u8
}

/// The block scale that code `q` stands for under row scale `u` (the exact float32 product).
#[inline]
pub fn scale_value(q: u8, u: f16) -> f32 {
    row_unit(u) * q as f32
}

const fn build_digits() -> [[u8; 5]; 256] {
    let mut t = [[1u8; 5]; 256];
    let mut v = 0;
    while v < 243 {
        let mut i = 0;
        let mut x = v;
        while i < 5 {
            t[v][i] = (x % 3) as u8;
            x /= 3;
            i += 1;
        }
        v += 1;
    }
    t
}

/// `DIGITS[byte][i]` is the stored digit `c = t + 1` (0, 1 or 2) of row `i` of the group.
/// Entries for invalid bytes (243..=255) are 1 (ternary 0); validation rejects such bytes.
pub static DIGITS: [[u8; 5]; 256] = build_digits();

/// Packs five digits `c` (each 0..=2, row 0 first) into one code byte.
#[inline]
pub fn pack_digits(c: [u8; 5]) -> u8 {
    c[0] + 3 * c[1] + 9 * c[2] + 27 * c[3] + 81 * c[4]
}

/// Writes row `i`'s ternary codes `t` into code bytes whose digit `i` is still 1 (t = 0, as in
/// `ZERO_CODE_BYTE`): adding `t 3^i` makes it `t + 1`. `negate`: the block's scale is negative,
/// so its codes are stored negated (the same weights).
#[inline]
pub fn add_row_codes(bytes: &mut [u8], t: &[i8], i: usize, negate: bool) {
    let step = if negate { POW3[i].wrapping_neg() } else { POW3[i] };
    for (b, &t) in bytes.iter_mut().zip(t) {
        *b = b.wrapping_add((t as u8).wrapping_mul(step));
    }
}

/// Errors of the format module: a malformed matrix, an unreadable file, an unknown version.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The arrays or metadata break a rule of FORMAT.md.
    #[error("{0}")]
    Invalid(String),
    /// The file was written by another layout version or is not a predprey file.
    #[error("{0}")]
    Version(String),
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError::Invalid(msg.into()))
}

/// One packed matrix (FORMAT.md, version 2). All arrays are exactly the stored arrays, except
/// `out_cols`, which is held as u32 in memory whatever its stored width (see `cols_u16`).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    /// N, output rows.
    pub rows: usize,
    /// K, input columns (unpadded).
    pub cols: usize,
    /// B, weights per block along K: 32, 64, 128 or 256.
    pub block_size: usize,
    /// Plane-1 codes, u8 [G, Kp], base-3 packed over the 5 rows of a group.
    pub codes: Vec<u8>,
    /// Plane-1 block-scale codes, u8 [N, nb]: block scale = `scale_value(code, row_scales[r])`.
    pub scales: Vec<u8>,
    /// Row scales `u`, f16 [N]: the unit of both planes' 8-bit scale codes of row `r`.
    pub row_scales: Vec<f16>,
    /// Plane-2 CSR over groups, u32 [G + 1].
    pub p2_ptr: Vec<u32>,
    /// Plane-2 block index per entry, u16 [E].
    pub p2_block: Vec<u16>,
    /// Plane-2 block-scale codes, u8 [E, 5] (row `5g+i` at `[e, i]`), under the same row scales.
    pub p2_scales: Vec<u8>,
    /// Plane-2 codes, u8 [E, B], base-3 packed like `codes`.
    pub p2_codes: Vec<u8>,
    /// Predator CSR over rows, u32 [N + 1].
    pub out_ptr: Vec<u32>,
    /// Predator columns [M] (stored as u16 when K <= 65536, else u32).
    pub out_cols: Vec<u32>,
    /// Predator values, f16 [M].
    pub out_vals: Vec<f16>,
}

/// Element type of one stored array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    U16,
    U32,
    F16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 | Dtype::F16 => 2,
            Dtype::U32 => 4,
        }
    }
    fn to_st(self) -> safetensors::Dtype {
        match self {
            Dtype::U8 => safetensors::Dtype::U8,
            Dtype::U16 => safetensors::Dtype::U16,
            Dtype::U32 => safetensors::Dtype::U32,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }
    fn from_st(d: safetensors::Dtype) -> Option<Dtype> {
        match d {
            safetensors::Dtype::U8 => Some(Dtype::U8),
            safetensors::Dtype::U16 => Some(Dtype::U16),
            safetensors::Dtype::U32 => Some(Dtype::U32),
            safetensors::Dtype::F16 => Some(Dtype::F16),
            _ => None,
        }
    }
    /// Name as used in messages and in the Python layout description.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "uint8",
            Dtype::U16 => "uint16",
            Dtype::U32 => "uint32",
            Dtype::F16 => "float16",
        }
    }
}

/// One stored array as little-endian bytes, with its dtype and shape.
#[derive(Clone, Debug)]
pub struct Tensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl safetensors::View for &Tensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_st()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Shape parameters derived from (N, K, B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    /// nb = ceil(K / B)
    pub n_blocks: usize,
    /// Kp = nb * B
    pub padded_cols: usize,
    /// G = ceil(N / 5)
    pub n_groups: usize,
}

impl Dims {
    /// Checks (N, K, B) and derives the rest.
    pub fn new(rows: usize, cols: usize, block_size: usize) -> Result<Dims, FormatError> {
        if rows == 0 || cols == 0 {
            return invalid(format!(
                "matrix is {rows}x{cols}; a packed matrix needs at least 1 row and 1 column"
            ));
        }
        if !BLOCK_SIZES.contains(&block_size) {
            return invalid(format!(
                "block_size is {block_size}; expected one of 32, 64, 128, 256"
            ));
        }
        let n_blocks = cols.div_ceil(block_size);
        if n_blocks > u16::MAX as usize + 1 {
            return invalid(format!(
                "K = {cols} gives {n_blocks} blocks of {block_size}; at most 65536 blocks per row"
            ));
        }
        if rows >= u32::MAX as usize / 2 {
            return invalid(format!("N = {rows} rows is too many (at most 2^31)"));
        }
        Ok(Dims {
            rows,
            cols,
            block_size,
            n_blocks,
            padded_cols: n_blocks * block_size,
            n_groups: rows.div_ceil(ROWS_PER_GROUP),
        })
    }
    /// Whether predator columns are stored as u16.
    pub fn cols_u16(&self) -> bool {
        self.cols <= MAX_K_U16_COLS
    }
    /// Bytes of the parts every matrix of this shape pays: plane-1 codes and scales plus both
    /// pointer arrays (with no plane-2 entry and no predator).
    pub fn fixed_bytes(&self) -> usize {
        self.n_groups * self.padded_cols
            + self.rows * self.n_blocks
            + 2 * self.rows
            + 4 * (self.n_groups + 1)
            + 4 * (self.rows + 1)
    }
    /// Bytes one plane-2 entry costs: B code bytes, 5 u8 scale codes, one u16 block index.
    pub fn p2_entry_bytes(&self) -> usize {
        self.block_size + ROWS_PER_GROUP + 2
    }
    /// Bytes one predator costs: its f16 value and its column index.
    pub fn predator_bytes(&self) -> usize {
        2 + if self.cols_u16() { 2 } else { 4 }
    }
}

impl PackedMatrix {
    /// Derived shape parameters.
    pub fn dims(&self) -> Dims {
        Dims {
            rows: self.rows,
            cols: self.cols,
            block_size: self.block_size,
            n_blocks: self.cols.div_ceil(self.block_size),
            padded_cols: self.cols.div_ceil(self.block_size) * self.block_size,
            n_groups: self.rows.div_ceil(ROWS_PER_GROUP),
        }
    }

    /// Number of plane-2 entries E.
    pub fn n_p2_entries(&self) -> usize {
        self.p2_block.len()
    }

    /// Number of predators M.
    pub fn n_outliers(&self) -> usize {
        self.out_vals.len()
    }

    /// 1 if no block has a second plane, else 2.
    pub fn planes(&self) -> usize {
        if self.p2_block.is_empty() {
            1
        } else {
            2
        }
    }

    /// Bytes of all ten stored arrays (the file body, without the safetensors header).
    pub fn nbytes(&self) -> usize {
        let d = self.dims();
        d.fixed_bytes() + self.n_p2_entries() * d.p2_entry_bytes()
            + self.n_outliers() * d.predator_bytes()
    }

    /// 8 * nbytes / (N * K): every stored byte counted.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.nbytes() as f64 / (self.rows as f64 * self.cols as f64)
    }

    /// Checks every rule of FORMAT.md. Cost is linear in the stored size.
    pub fn validate(&self) -> Result<(), FormatError> {
        let d = Dims::new(self.rows, self.cols, self.block_size)?;
        let (g, nb, kp, b) = (d.n_groups, d.n_blocks, d.padded_cols, d.block_size);
        let e = self.p2_block.len();
        let m = self.out_vals.len();
        let check_len = |name: &str, got: usize, want: usize| {
            if got != want {
                invalid(format!("array `{name}` has {got} elements; expected {want}"))
            } else {
                Ok(())
            }
        };
        check_len("codes", self.codes.len(), g * kp)?;
        check_len("scales", self.scales.len(), self.rows * nb)?;
        check_len("row_scales", self.row_scales.len(), self.rows)?;
        check_len("p2_ptr", self.p2_ptr.len(), g + 1)?;
        check_len("p2_scales", self.p2_scales.len(), e * ROWS_PER_GROUP)?;
        check_len("p2_codes", self.p2_codes.len(), e * b)?;
        check_len("out_ptr", self.out_ptr.len(), self.rows + 1)?;
        check_len("out_cols", self.out_cols.len(), m)?;
        let pad_rows = g * ROWS_PER_GROUP - self.rows;
        check_codes("codes", &self.codes, kp, self.cols, pad_rows, |i| i / kp == g - 1)?;
        for (name, arr) in [("row_scales", &self.row_scales), ("out_vals", &self.out_vals)] {
            if let Some(i) = arr.iter().position(|v| !v.is_finite()) {
                return invalid(format!("array `{name}` has a non-finite value at index {i}; expected finite FP16"));
            }
        }
        check_ptr("p2_ptr", &self.p2_ptr, e)?;
        check_ptr("out_ptr", &self.out_ptr, m)?;
        for gi in 0..g {
            let (s, t) = (self.p2_ptr[gi] as usize, self.p2_ptr[gi + 1] as usize);
            for j in s..t {
                let blk = self.p2_block[j] as usize;
                if blk >= nb {
                    return invalid(format!("p2_block[{j}] = {blk} (group {gi}) is out of range; expected < {nb} blocks"));
                }
                if j > s && self.p2_block[j - 1] as usize >= blk {
                    return invalid(format!("p2_block is not strictly increasing in group {gi} at entry {j}"));
                }
                let last_group = gi == g - 1;
                let block_cols = (self.cols - blk * b).min(b);
                check_codes("p2_codes", &self.p2_codes[j * b..(j + 1) * b], b, block_cols, pad_rows, |_| last_group)
                    .map_err(|err| FormatError::Invalid(format!("{err} (entry {j})")))?;
                if last_group {
                    for i in (ROWS_PER_GROUP - pad_rows)..ROWS_PER_GROUP {
                        if self.p2_scales[j * ROWS_PER_GROUP + i] != 0 {
                            return invalid(format!("p2_scales[{j}, {i}] belongs to a padding row and must be 0"));
                        }
                    }
                }
            }
        }
        for r in 0..self.rows {
            let (s, t) = (self.out_ptr[r] as usize, self.out_ptr[r + 1] as usize);
            for j in s..t {
                let c = self.out_cols[j] as usize;
                if c >= self.cols {
                    return invalid(format!("out_cols[{j}] = {c} (row {r}) is out of range; expected < K = {}", self.cols));
                }
                if j > s && self.out_cols[j - 1] as usize >= c {
                    return invalid(format!("out_cols is not strictly increasing in row {r} at index {j}"));
                }
                if self.plane_code(r, c) != 0 || self.plane2_code(r, c) != 0 {
                    return invalid(format!("predator at row {r}, col {c} has a non-zero ternary code; expected 0 under every predator"));
                }
            }
        }
        Ok(())
    }

    /// Plane-1 ternary code (-1, 0, +1) of weight (r, k). `r < N`, `k < Kp`.
    #[inline]
    pub fn plane_code(&self, r: usize, k: usize) -> i8 {
        let kp = self.dims().padded_cols;
        let byte = self.codes[(r / ROWS_PER_GROUP) * kp + k];
        DIGITS[byte as usize][r % ROWS_PER_GROUP] as i8 - 1
    }

    /// Index range of the plane-2 entries of group `g`.
    #[inline]
    pub fn p2_range(&self, g: usize) -> std::ops::Range<usize> {
        self.p2_ptr[g] as usize..self.p2_ptr[g + 1] as usize
    }

    /// The plane-2 entry of (group of r, block of k), if any.
    pub fn p2_entry(&self, r: usize, k: usize) -> Option<usize> {
        let blk = (k / self.block_size) as u16;
        let range = self.p2_range(r / ROWS_PER_GROUP);
        let s = range.start;
        self.p2_block[range].binary_search(&blk).ok().map(|j| s + j)
    }

    /// Plane-2 ternary code of weight (r, k); 0 where the block has no plane-2 entry.
    pub fn plane2_code(&self, r: usize, k: usize) -> i8 {
        match self.p2_entry(r, k) {
            Some(e) => {
                let byte = self.p2_codes[e * self.block_size + k % self.block_size];
                DIGITS[byte as usize][r % ROWS_PER_GROUP] as i8 - 1
            }
            None => 0,
        }
    }

    /// Plane-1 scale of block `blk` of row `r`, as float32.
    #[inline]
    pub fn scale(&self, r: usize, blk: usize) -> f32 {
        scale_value(self.scales[r * self.dims().n_blocks + blk], self.row_scales[r])
    }

    /// Plane-2 scale of row `r` in entry `e` (an entry of r's group), as float32.
    #[inline]
    pub fn p2_scale(&self, e: usize, r: usize) -> f32 {
        scale_value(self.p2_scales[e * ROWS_PER_GROUP + r % ROWS_PER_GROUP], self.row_scales[r])
    }

    /// Reference decode of row `r` into `out[..K]` (float32), straight from FORMAT.md.
    /// This is the definition every kernel is tested against; it is not fast.
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let d = self.dims();
        let (b, kp) = (d.block_size, d.padded_cols);
        let (g, i) = (r / ROWS_PER_GROUP, r % ROWS_PER_GROUP);
        for (k, o) in out.iter_mut().enumerate().take(self.cols) {
            let t1 = DIGITS[self.codes[g * kp + k] as usize][i] as f32 - 1.0;
            *o = self.scale(r, k / b) * t1;
        }
        for e in self.p2_range(g) {
            let blk = self.p2_block[e] as usize;
            let s2 = self.p2_scale(e, r);
            for kk in 0..b {
                let k = blk * b + kk;
                if k < self.cols {
                    let t2 = DIGITS[self.p2_codes[e * b + kk] as usize][i] as f32 - 1.0;
                    out[k] += s2 * t2;
                }
            }
        }
        for j in self.out_ptr[r] as usize..self.out_ptr[r + 1] as usize {
            out[self.out_cols[j] as usize] += self.out_vals[j].to_f32();
        }
    }

    /// The dense matrix W, float32 [N, K] row-major.
    pub fn decompress(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        for (r, row) in w.chunks_mut(self.cols).enumerate() {
            self.decode_row(r, row);
        }
        w
    }

    /// The ten stored arrays, in `TENSOR_NAMES` order, as little-endian bytes.
    pub fn to_tensors(&self) -> Vec<(&'static str, Tensor<'_>)> {
        let d = self.dims();
        let e = self.n_p2_entries();
        let m = self.n_outliers();
        fn f16_bytes(v: &[f16]) -> Cow<'_, [u8]> {
            Cow::Owned(v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect())
        }
        let cols: (Dtype, Cow<'_, [u8]>) = if d.cols_u16() {
            (Dtype::U16, Cow::Owned(self.out_cols.iter().flat_map(|&c| (c as u16).to_le_bytes()).collect()))
        } else {
            (Dtype::U32, Cow::Owned(self.out_cols.iter().flat_map(|c| c.to_le_bytes()).collect()))
        };
        let t = |dtype, shape: Vec<usize>, data| Tensor { dtype, shape, data };
        vec![
            ("codes", t(Dtype::U8, vec![d.n_groups, d.padded_cols], Cow::Borrowed(&self.codes[..]))),
            ("scales", t(Dtype::U8, vec![self.rows, d.n_blocks], Cow::Borrowed(&self.scales[..]))),
            ("row_scales", t(Dtype::F16, vec![self.rows], f16_bytes(&self.row_scales))),
            ("p2_ptr", t(Dtype::U32, vec![d.n_groups + 1], Cow::Owned(self.p2_ptr.iter().flat_map(|c| c.to_le_bytes()).collect()))),
            ("p2_block", t(Dtype::U16, vec![e], Cow::Owned(self.p2_block.iter().flat_map(|c| c.to_le_bytes()).collect()))),
            ("p2_scales", t(Dtype::U8, vec![e, ROWS_PER_GROUP], Cow::Borrowed(&self.p2_scales[..]))),
            ("p2_codes", t(Dtype::U8, vec![e, d.block_size], Cow::Borrowed(&self.p2_codes[..]))),
            ("out_ptr", t(Dtype::U32, vec![self.rows + 1], Cow::Owned(self.out_ptr.iter().flat_map(|c| c.to_le_bytes()).collect()))),
            ("out_cols", t(cols.0, vec![m], cols.1)),
            ("out_vals", t(Dtype::F16, vec![m], f16_bytes(&self.out_vals))),
        ]
    }

    /// Metadata strings stored beside the arrays (safetensors `__metadata__`).
    pub fn metadata(&self) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "predprey".to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("rows".to_string(), self.rows.to_string()),
            ("cols".to_string(), self.cols.to_string()),
            ("block_size".to_string(), self.block_size.to_string()),
        ])
    }

    /// Rebuilds and validates a matrix from its metadata and arrays (by name). Every dtype,
    /// shape and rule of FORMAT.md is checked; `get` returns None for a missing array.
    pub fn from_tensors<'a>(
        meta: &HashMap<String, String>,
        get: impl Fn(&str) -> Option<Tensor<'a>>,
    ) -> Result<PackedMatrix, FormatError> {
        let field = |k: &str| -> Result<&String, FormatError> {
            meta.get(k).ok_or_else(|| FormatError::Version(format!("metadata has no `{k}`; not a predprey matrix")))
        };
        if field("format")? != "predprey" {
            return Err(FormatError::Version(format!("metadata format is {:?}; expected \"predprey\"", field("format")?)));
        }
        let ver = field("format_version")?;
        if ver != &FORMAT_VERSION.to_string() {
            return Err(FormatError::Version(format!(
                "format_version is {ver:?}; this build reads version {FORMAT_VERSION} only"
            )));
        }
        let num = |k: &str| -> Result<usize, FormatError> {
            let v = field(k)?;
            v.parse::<usize>().map_err(|_| FormatError::Invalid(format!("metadata `{k}` = {v:?} is not a non-negative integer")))
        };
        let d = Dims::new(num("rows")?, num("cols")?, num("block_size")?)?;
        let fetch = |name: &str, dtype: Dtype, ndim: usize| -> Result<Tensor<'a>, FormatError> {
            let t = get(name).ok_or_else(|| FormatError::Invalid(format!("array `{name}` is missing")))?;
            if t.dtype != dtype {
                return invalid(format!("array `{name}` has dtype {}; expected {}", t.dtype.name(), dtype.name()));
            }
            if t.shape.len() != ndim {
                return invalid(format!("array `{name}` has {} dims; expected {ndim}", t.shape.len()));
            }
            let n: usize = t.shape.iter().product();
            if t.data.len() != n * dtype.size() {
                return invalid(format!("array `{name}` holds {} bytes; its shape {:?} needs {}", t.data.len(), t.shape, n * dtype.size()));
            }
            Ok(t)
        };
        let want_shape = |name: &str, t: &Tensor, shape: &[usize]| {
            if t.shape != shape {
                invalid(format!("array `{name}` has shape {:?}; expected {:?}", t.shape, shape))
            } else {
                Ok(())
            }
        };
        let u16s = |t: &Tensor| -> Vec<u16> { t.data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect() };
        let u32s = |t: &Tensor| -> Vec<u32> { t.data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
        let f16s = |t: &Tensor| -> Vec<f16> { u16s(t).into_iter().map(f16::from_bits).collect() };

        let codes = fetch("codes", Dtype::U8, 2)?;
        want_shape("codes", &codes, &[d.n_groups, d.padded_cols])?;
        let scales = fetch("scales", Dtype::U8, 2)?;
        want_shape("scales", &scales, &[d.rows, d.n_blocks])?;
        let row_scales = fetch("row_scales", Dtype::F16, 1)?;
        want_shape("row_scales", &row_scales, &[d.rows])?;
        let p2_ptr = fetch("p2_ptr", Dtype::U32, 1)?;
        want_shape("p2_ptr", &p2_ptr, &[d.n_groups + 1])?;
        let p2_block = fetch("p2_block", Dtype::U16, 1)?;
        let e = p2_block.shape[0];
        let p2_scales = fetch("p2_scales", Dtype::U8, 2)?;
        want_shape("p2_scales", &p2_scales, &[e, ROWS_PER_GROUP])?;
        let p2_codes = fetch("p2_codes", Dtype::U8, 2)?;
        want_shape("p2_codes", &p2_codes, &[e, d.block_size])?;
        let out_ptr = fetch("out_ptr", Dtype::U32, 1)?;
        want_shape("out_ptr", &out_ptr, &[d.rows + 1])?;
        let out_vals = fetch("out_vals", Dtype::F16, 1)?;
        let m = out_vals.shape[0];
        let col_dtype = if d.cols_u16() { Dtype::U16 } else { Dtype::U32 };
        let out_cols = fetch("out_cols", col_dtype, 1)?;
        want_shape("out_cols", &out_cols, &[m])?;
        let p = PackedMatrix {
            rows: d.rows,
            cols: d.cols,
            block_size: d.block_size,
            codes: codes.data.into_owned(),
            scales: scales.data.into_owned(),
            row_scales: f16s(&row_scales),
            p2_ptr: u32s(&p2_ptr),
            p2_block: u16s(&p2_block),
            p2_scales: p2_scales.data.into_owned(),
            p2_codes: p2_codes.data.into_owned(),
            out_ptr: u32s(&out_ptr),
            out_cols: if d.cols_u16() { u16s(&out_cols).into_iter().map(u32::from).collect() } else { u32s(&out_cols) },
            out_vals: f16s(&out_vals),
        };
        p.validate()?;
        Ok(p)
    }

    /// Serialises to safetensors bytes (header + the ten arrays). Deterministic: the same
    /// matrix always gives the same bytes (metadata keys sorted, tensors in `TENSOR_NAMES`
    /// order), so files can be checksummed and deduplicated.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let tensors = self.to_tensors();
        let mut meta: Vec<(String, String)> = self.metadata().into_iter().collect();
        meta.sort();
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::Value::Object(
            meta.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect()));
        let mut offset = 0usize;
        for (name, t) in &tensors {
            let st = match t.dtype {
                Dtype::U8 => "U8",
                Dtype::U16 => "U16",
                Dtype::U32 => "U32",
                Dtype::F16 => "F16",
            };
            header.insert((*name).into(), serde_json::json!({
                "dtype": st, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()],
            }));
            offset += t.data.len();
        }
        // serde_json's Map keeps insertion order only with `preserve_order`; write it by hand.
        let mut json = String::from("{");
        let mut first = true;
        let mut put = |k: &str, v: &serde_json::Value| {
            if !first {
                json.push(',');
            }
            first = false;
            json.push_str(&serde_json::to_string(k).unwrap_or_default());
            json.push(':');
            json.push_str(&serde_json::to_string(v).unwrap_or_default());
        };
        put("__metadata__", &header["__metadata__"]);
        for (name, _) in &tensors {
            put(name, &header[*name]);
        }
        json.push('}');
        while json.len() % 8 != 0 {
            json.push(' ');
        }
        let mut out = Vec::with_capacity(8 + json.len() + offset);
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(json.as_bytes());
        for (_, t) in &tensors {
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    /// Parses and validates safetensors bytes written by `to_safetensors_bytes`.
    pub fn from_safetensors_bytes(buf: &[u8]) -> Result<PackedMatrix, FormatError> {
        let st = safetensors::SafeTensors::deserialize(buf)
            .map_err(|e| FormatError::Invalid(format!("not a readable safetensors file (truncated or corrupted?): {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(buf)
            .map_err(|e| FormatError::Invalid(format!("unreadable safetensors header: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        check_array_names(st.names())?;
        PackedMatrix::from_tensors(&meta, |name| {
            let v = st.tensor(name).ok()?;
            Some(Tensor { dtype: Dtype::from_st(v.dtype())?, shape: v.shape().to_vec(), data: Cow::Borrowed(v.data()) })
        })
        .or_else(|e| match e {
            // A dtype we do not know surfaces as "missing"; say what it really is.
            FormatError::Invalid(msg) if msg.ends_with("is missing") => {
                for n in TENSOR_NAMES {
                    if let Ok(v) = st.tensor(n) {
                        if Dtype::from_st(v.dtype()).is_none() {
                            return invalid(format!("array `{n}` has dtype {:?}; not a predprey dtype", v.dtype()));
                        }
                    }
                }
                Err(FormatError::Invalid(msg))
            }
            other => Err(other),
        })
    }

    /// Writes one matrix per safetensors file, atomically: a temporary file in the same
    /// directory is written, flushed and renamed over `path`; on failure nothing is left.
    pub fn save(&self, path: &Path) -> Result<(), FormatError> {
        let bytes = self.to_safetensors_bytes()?;
        write_atomic(path, &bytes)
    }

    /// Reads and validates a file written by `save`.
    pub fn load(path: &Path) -> Result<PackedMatrix, FormatError> {
        let buf = std::fs::read(path).map_err(|e| FormatError::Io { path: path.display().to_string(), source: e })?;
        PackedMatrix::from_safetensors_bytes(&buf).map_err(|e| match e {
            FormatError::Invalid(m) => FormatError::Invalid(format!("{}: {m}", path.display())),
            FormatError::Version(m) => FormatError::Version(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

/// A packed matrix spelled out densely, for tools that choose codes themselves (e.g. the
/// calibration's error-feedback pass): every array is row-major over the real N x K weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Parts {
    pub rows: usize,
    pub cols: usize,
    pub block_size: usize,
    /// Plane-1 codes, -1/0/+1, [N, K].
    pub t1: Vec<i8>,
    /// Plane-1 scales, [N, nb].
    pub s1: Vec<f32>,
    /// Which (group, block) cells carry plane 2, [G, nb].
    pub p2: Vec<bool>,
    /// Plane-2 codes, [N, K] (0 outside plane-2 cells).
    pub t2: Vec<i8>,
    /// Plane-2 scales, [N, nb] (0 outside plane-2 cells).
    pub s2: Vec<f32>,
    /// Predator values, [N, K]; NaN where there is no predator.
    pub pred: Vec<f32>,
    /// Row scales [N] to keep (e.g. those of the matrix `to_parts` read), or empty: then
    /// `from_parts` picks each row's (see there).
    pub row_scales: Vec<f32>,
}

impl PackedMatrix {
    /// The dense spelling of this matrix (inverse of `from_parts`).
    pub fn to_parts(&self) -> Parts {
        let d = self.dims();
        let (n, k, nb) = (self.rows, self.cols, d.n_blocks);
        let mut p = Parts {
            rows: n, cols: k, block_size: d.block_size,
            t1: vec![0; n * k], s1: (0..n * nb).map(|j| self.scale(j / nb, j % nb)).collect(),
            p2: vec![false; d.n_groups * nb], t2: vec![0; n * k], s2: vec![0.0; n * nb],
            pred: vec![f32::NAN; n * k],
            row_scales: self.row_scales.iter().map(|v| v.to_f32()).collect(),
        };
        for r in 0..n {
            for c in 0..k {
                p.t1[r * k + c] = self.plane_code(r, c);
            }
            for j in self.out_ptr[r] as usize..self.out_ptr[r + 1] as usize {
                p.pred[r * k + self.out_cols[j] as usize] = self.out_vals[j].to_f32();
            }
        }
        for g in 0..d.n_groups {
            for e in self.p2_range(g) {
                let blk = self.p2_block[e] as usize;
                p.p2[g * nb + blk] = true;
                for r in g * ROWS_PER_GROUP..((g + 1) * ROWS_PER_GROUP).min(n) {
                    p.s2[r * nb + blk] = self.p2_scale(e, r);
                    for kk in 0..d.block_size {
                        let c = blk * d.block_size + kk;
                        if c < k {
                            p.t2[r * k + c] = DIGITS[self.p2_codes[e * d.block_size + kk] as usize][r % ROWS_PER_GROUP] as i8 - 1;
                        }
                    }
                }
            }
        }
        p
    }

    /// Packs a dense spelling. Block scales (finite, |s| <= 65504) become 8-bit codes under one
    /// FP16 row scale per row (`scale_code`): the given `row_scales[r]` when there are some and
    /// every |s| of the row fits under it (code <= 255), else `row_scale_for` the row's largest
    /// |s| over both planes' cells. So `from_parts(to_parts(m)) == m`. A negative scale is
    /// stored as |s| with its block's codes negated (the same weights). Predator values are
    /// rounded to FP16. Codes must be -1/0/+1, zero under predators and zero in plane 2 outside
    /// its cells. The result is validated.
    pub fn from_parts(p: &Parts) -> Result<PackedMatrix, FormatError> {
        let d = Dims::new(p.rows, p.cols, p.block_size)?;
        let (n, k, nb, b, kp) = (p.rows, p.cols, d.n_blocks, d.block_size, d.padded_cols);
        for (name, len, want) in [("t1", p.t1.len(), n * k), ("t2", p.t2.len(), n * k), ("pred", p.pred.len(), n * k),
                                  ("s1", p.s1.len(), n * nb), ("s2", p.s2.len(), n * nb), ("p2", p.p2.len(), d.n_groups * nb)] {
            if len != want {
                return invalid(format!("part `{name}` has {len} elements; expected {want}"));
            }
        }
        if !p.row_scales.is_empty() && p.row_scales.len() != n {
            return invalid(format!("part `row_scales` has {} elements; expected {n} or none", p.row_scales.len()));
        }
        for (name, t) in [("t1", &p.t1), ("t2", &p.t2)] {
            if let Some(i) = t.iter().position(|v| !(-1..=1).contains(v)) {
                return invalid(format!("part `{name}` has code {} at row {}, col {}; expected -1, 0 or +1", t[i], i / k, i % k));
            }
        }
        for (name, s) in [("s1", &p.s1), ("s2", &p.s2)] {
            if let Some(i) = s.iter().position(|v| !v.is_finite() || v.abs() > 65504.0) {
                return invalid(format!("part `{name}` has scale {} at index {i}; expected finite and |s| <= 65504", s[i]));
            }
        }
        let row_scales: Vec<f16> = (0..n).map(|r| {
            let g = r / ROWS_PER_GROUP;
            let m1 = p.s1[r * nb..(r + 1) * nb].iter().fold(0f32, |a, v| a.max(v.abs()));
            let m2 = (0..nb).filter(|&blk| p.p2[g * nb + blk]).fold(0f32, |a, blk| a.max(p.s2[r * nb + blk].abs()));
            let m = m1.max(m2);
            match p.row_scales.get(r).map(|&u| f16::from_f32(u)) {
                Some(u) if u.is_finite() && u.to_f32() > 0.0 && fits_row_scale(m, u) => u,
                _ => row_scale_for(m),
            }
        }).collect();
        // -1 where a block's scale is negative (its codes are stored negated), else +1.
        let sign = |s: f32| if s < 0.0 { -1i16 } else { 1 };
        let mut m = PackedMatrix {
            rows: n, cols: k, block_size: b, codes: vec![ZERO_CODE_BYTE; d.n_groups * kp],
            scales: (0..n * nb).map(|j| scale_code(p.s1[j].abs(), row_scales[j / nb])).collect(),
            row_scales,
            p2_ptr: vec![0], p2_block: vec![], p2_scales: vec![], p2_codes: vec![],
            out_ptr: vec![0], out_cols: vec![], out_vals: vec![],
        };
        for r in 0..n {
            let (g, i) = (r / ROWS_PER_GROUP, r % ROWS_PER_GROUP);
            for c in 0..k {
                let pos = r * k + c;
                let v = p.pred[pos];
                if !v.is_nan() {
                    if !v.is_finite() || v.abs() > 65504.0 {
                        return invalid(format!("predator at row {r}, col {c} is {v}; expected finite and |v| <= 65504"));
                    }
                    if p.t1[pos] != 0 || p.t2[pos] != 0 {
                        return invalid(format!("predator at row {r}, col {c} has a non-zero ternary code; expected 0"));
                    }
                    m.out_cols.push(c as u32);
                    m.out_vals.push(f16::from_f32(v));
                }
                if p.t2[pos] != 0 && !p.p2[g * nb + c / b] {
                    return invalid(format!("plane-2 code at row {r}, col {c} lies outside the plane-2 cells"));
                }
                // Adding (c - 1) * 3^i to the all-zero byte sets digit i to c.
                let byte = &mut m.codes[g * kp + c];
                *byte = (*byte as i16 + sign(p.s1[r * nb + c / b]) * p.t1[pos] as i16 * POW3[i] as i16) as u8;
            }
            m.out_ptr.push(m.out_vals.len() as u32);
        }
        for g in 0..d.n_groups {
            for blk in 0..nb {
                if !p.p2[g * nb + blk] {
                    continue;
                }
                m.p2_block.push(blk as u16);
                let mut codes = vec![ZERO_CODE_BYTE; b];
                for i in 0..ROWS_PER_GROUP {
                    let r = g * ROWS_PER_GROUP + i;
                    if r >= n {
                        m.p2_scales.push(0);
                        continue;
                    }
                    let s2 = p.s2[r * nb + blk];
                    m.p2_scales.push(scale_code(s2.abs(), m.row_scales[r]));
                    let k0 = r * k + blk * b;
                    add_row_codes(&mut codes, &p.t2[k0..k0 + b.min(k - blk * b)], i, s2 < 0.0);
                }
                m.p2_codes.extend_from_slice(&codes);
            }
            m.p2_ptr.push(m.p2_block.len() as u32);
        }
        m.validate()?;
        Ok(m)
    }
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    use std::io::Write;
    let io = |e| FormatError::Io { path: path.display().to_string(), source: e };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| FormatError::Invalid(format!("{}: not a file path", path.display())))?;
    // Unique per process and per call, so concurrent saves never share a temporary file.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp{}-{n}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

fn check_ptr(name: &str, ptr: &[u32], total: usize) -> Result<(), FormatError> {
    if ptr[0] != 0 {
        return invalid(format!("{name}[0] = {}; expected 0", ptr[0]));
    }
    if let Some(i) = ptr.windows(2).position(|w| w[1] < w[0]) {
        return invalid(format!("{name} decreases at index {}; expected non-decreasing", i + 1));
    }
    let last = *ptr.last().unwrap() as usize;
    if last != total {
        return invalid(format!("{name} ends at {last}; expected {total} (the number of entries)"));
    }
    Ok(())
}

/// Checks code bytes laid out in rows of `width` columns: each byte <= 242, columns at or past
/// `real_cols` are all-zero (121), and in rows where `last(i)` holds the top `pad_rows` digits are 1.
fn check_codes(
    name: &str,
    codes: &[u8],
    width: usize,
    real_cols: usize,
    pad_rows: usize,
    last: impl Fn(usize) -> bool,
) -> Result<(), FormatError> {
    if let Some(i) = codes.iter().position(|&c| c > MAX_CODE_BYTE) {
        return invalid(format!("array `{name}` has invalid code byte {} at index {i}; expected <= 242", codes[i]));
    }
    for (i, &c) in codes.iter().enumerate() {
        let col = i % width;
        if col >= real_cols && c != ZERO_CODE_BYTE {
            return invalid(format!("array `{name}` has a non-zero code in padding column {col} (index {i})"));
        }
        if pad_rows > 0 && last(i) {
            let digits = &DIGITS[c as usize];
            if digits[ROWS_PER_GROUP - pad_rows..].iter().any(|&dg| dg != 1) {
                return invalid(format!("array `{name}` has a non-zero code in a padding row (index {i})"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PackedMatrix {
        // 2 x 40 with B = 32: one group (3 padding rows), 2 blocks, Kp = 64.
        let d = Dims::new(2, 40, 32).unwrap();
        let mut codes = vec![ZERO_CODE_BYTE; d.n_groups * d.padded_cols];
        codes[0] = pack_digits([2, 0, 1, 1, 1]); // r0 k0 = +1, r1 k0 = -1
        codes[33] = pack_digits([0, 2, 1, 1, 1]); // r0 k33 = -1, r1 k33 = +1
        let mut p2 = vec![ZERO_CODE_BYTE; 32];
        p2[1] = pack_digits([2, 2, 1, 1, 1]); // block 1, k = 33
        PackedMatrix {
            rows: 2,
            cols: 40,
            block_size: 32,
            codes,
            // Row 0: unit 4 (scale = 4 q / 256): 0.5, 2.0; row 1: unit 8: 0.25, 4.0.
            scales: vec![32, 128, 8, 128],
            row_scales: [4.0, 8.0].map(f16::from_f32).to_vec(),
            p2_ptr: vec![0, 1],
            p2_block: vec![1],
            p2_scales: vec![8, 32, 0, 0, 0], // 0.125, 1.0
            p2_codes: p2,
            out_ptr: vec![0, 1, 1],
            out_cols: vec![39],
            out_vals: vec![f16::from_f32(-3.0)],
        }
    }

    #[test]
    fn digits_roundtrip() {
        for v in 0..243u16 {
            let d = DIGITS[v as usize];
            assert_eq!(pack_digits(d) as u16, v);
        }
        assert_eq!(DIGITS[ZERO_CODE_BYTE as usize], [1; 5]);
    }

    #[test]
    fn decode_by_hand() {
        let p = tiny();
        p.validate().unwrap();
        let w = p.decompress();
        let mut want = vec![0f32; 80];
        want[0] = 0.5;
        want[33] = -2.0 + 0.125;
        want[39] = -3.0;
        want[40] = -0.25;
        want[40 + 33] = 4.0 + 1.0;
        assert_eq!(w, want);
        // 64 code bytes + 4 scale codes + 2*2 row scales + 2*4 p2_ptr + (32 + 5 + 2) entry
        // + 3*4 out_ptr + 4 predator
        assert_eq!(p.nbytes(), 64 + 4 + 4 + 8 + 39 + 12 + 4);
        assert_eq!(p.nbytes(), p.to_tensors().iter().map(|(_, t)| t.data.len()).sum::<usize>());
    }

    #[test]
    fn parts_roundtrip() {
        let p = tiny();
        let parts = p.to_parts();
        assert_eq!(PackedMatrix::from_parts(&parts).unwrap(), p);
        let mut bad = parts.clone();
        bad.t1[39] = 1; // under the predator at (0, 39)
        assert!(PackedMatrix::from_parts(&bad).is_err());
        let mut bad = parts.clone();
        bad.t2[0] = 1; // block 0 has no plane 2
        assert!(PackedMatrix::from_parts(&bad).is_err());
        let mut bad = parts.clone();
        bad.t1[3] = 2;
        assert!(PackedMatrix::from_parts(&bad).is_err());
        // A negative scale is stored as |s| with the block's codes negated: same weights.
        let mut neg = parts;
        neg.s1[1] = -neg.s1[1];
        for c in 32..40 {
            neg.t1[c] = -neg.t1[c];
        }
        let q = PackedMatrix::from_parts(&neg).unwrap();
        assert_eq!(q.decompress(), p.decompress());
        assert!(q.scales.iter().zip(&p.scales).all(|(a, b)| a == b));
    }

    #[test]
    fn scale_codes_round_to_the_row_grid() {
        for &m in &[1e-9f32, 1e-6, 1.01e-6, 3e-4, 0.02, 1.0, 7.5, 3000.0, 60000.0] {
            let u = row_scale_for(m);
            assert!(u.to_f32() > 0.0 && u.is_finite());
            let q = scale_code(m, u);
            assert!(q >= 254 || m < 1e-5, "max scale {m} got code {q}");
            assert!(m * SCALE_DIV <= 255.5 * u.to_f32(), "max scale {m} clamps under {u}");
            assert!(fits_row_scale(m, u));
            // Rounding error at most half a step (plus FP16 rounding of u, relative 2^-11).
            for f in [1.0f32, 0.77, 0.5, 0.1, 0.013] {
                let s = m * f;
                let back = scale_value(scale_code(s, u), u);
                assert!((back - s).abs() <= 0.5 * u.to_f32() / SCALE_DIV * 1.001 + 1e-12, "{m} {f}: {s} -> {back}");
            }
        }
        assert_eq!(row_scale_for(0.0), f16::ZERO);
        assert_eq!(scale_code(1.0, f16::ZERO), 0);
    }

    #[test]
    fn file_roundtrip_and_rejections() {
        let p = tiny();
        let bytes = p.to_safetensors_bytes().unwrap();
        assert_eq!(PackedMatrix::from_safetensors_bytes(&bytes).unwrap(), p);
        assert_eq!(bytes, p.to_safetensors_bytes().unwrap(), "serialisation must be deterministic");
        // The safetensors crate reads what we write.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("codes").unwrap().data(), &p.codes[..]);
        // truncated
        assert!(PackedMatrix::from_safetensors_bytes(&bytes[..bytes.len() - 3]).is_err());
        // wrong version
        let mut meta = p.metadata();
        meta.insert("format_version".into(), "99".into());
        let t = p.to_tensors();
        let err = PackedMatrix::from_tensors(&meta, |n| t.iter().find(|(m, _)| *m == n).map(|(_, t)| t.clone())).unwrap_err();
        assert!(matches!(err, FormatError::Version(_)), "{err}");
    }

    #[test]
    fn validation_catches_breakage() {
        let mut p = tiny();
        p.codes[5] = 250;
        assert!(p.validate().unwrap_err().to_string().contains("invalid code byte"));
        let mut p = tiny();
        p.codes[50] = pack_digits([2, 1, 1, 1, 1]); // padding column 50 >= K = 40
        assert!(p.validate().unwrap_err().to_string().contains("padding column"));
        let mut p = tiny();
        p.codes[3] = pack_digits([1, 1, 2, 1, 1]); // padding row 2
        assert!(p.validate().unwrap_err().to_string().contains("padding row"));
        let mut p = tiny();
        p.out_cols[0] = 0; // predator on a non-zero code
        assert!(p.validate().unwrap_err().to_string().contains("non-zero ternary code"));
        let mut p = tiny();
        p.row_scales[1] = f16::NAN;
        assert!(p.validate().unwrap_err().to_string().contains("non-finite"));
        let mut p = tiny();
        p.p2_scales[3] = 1; // padding row 3
        assert!(p.validate().unwrap_err().to_string().contains("padding row"));
        let mut p = tiny();
        p.p2_ptr[1] = 2;
        assert!(p.validate().is_err());
    }
}
