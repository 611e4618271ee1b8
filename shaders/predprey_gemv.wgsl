// predprey_gemv.wgsl: y = W x (batch 1) and Y = X W^T (batch NB <= 8 per slice, more slices via
// the z grid) computed straight from the packed format v2 (FORMAT.md). Plane 1, plane 2 and
// the FP16 predators are summed in the same dispatch; each output is written once, no atomics.
// A block scale is its 8-bit code times the row's unit row_scales[r] / 256 (both planes).
//
// Load together with exactly one of reduce_subgroup.wgsl / reduce_workgroup.wgsl (appended
// after this file); it provides `fn reduce_acc(lid: u32, n: u32)` and `red`.
//
// Buffer layout. All little-endian. Arrays of u8 / u16 / f16 are read as u32 words: element i
// of a u16 or f16 array is the low half of word i/2 when i is even, the high half when odd;
// element i of a u8 array is byte i % 4 (bits 8 (i % 4) ..) of word i / 4; the code arrays are
// read 16 bytes at a time as vec4<u32>. Every buffer is zero-padded to a
// multiple of 16 bytes. A large matrix is split into chunks of whole row groups, each with its
// own buffers and Params (row0 = its first row); the arrays below are those of one chunk.
//   @binding(0) P        uniform Params (below).
//   @binding(1) x        f32 [S*NB, Kp] as vec4<f32>: input rows, zero past column K.
//   @binding(2) y        f32 [S*NB, P.y_stride]: outputs; this chunk writes row0 .. row0+rows.
//   @binding(3) codes    u8  [G, Kp]   plane-1 codes, base 3 over the 5 rows of a group.
//   @binding(4) scales   u8  [N, nb]   plane-1 block-scale codes.
//   @binding(5) p2codes  u8  [E, B]    plane-2 codes of each entry.
//   @binding(6) meta     u32 words, sections at word offsets:
//                          0                 p2_ptr    u32 [G + 1], rebased to the chunk
//                          P.off_p2_block    p2_block  u16 [E]
//                          P.off_p2_scales   p2_scales u8 [E, 5]  plane-2 block-scale codes
//                          P.off_out_ptr     out_ptr   u32 [N + 1], rebased to the chunk
//                          P.off_out_cols    out_cols  u16 [M] if P.cols_u16 == 1 else u32 [M]
//                          P.off_out_vals    out_vals  f16 [M]
//                          P.off_row_scales  row_scales f16 [N]
// (G, N, E, M: the chunk's groups, rows, plane-2 entries and predators; Kp = nb * B.)
//
// Decoding. A code byte v holds the balanced-ternary number v - 121 = sum_i t_i 3^i (t_i is the
// ternary code of row i of the group). With R_i = round((v - 121) / 3^i) we have
// t_i = R_i - 3 R_{i+1} (R_5 = 0), so for a run of columns sum_k t_i x_k = S_i - 3 S_{i+1} with
// S_i = sum_k R_i x_k: five FMAs per byte, shared by the five rows. R_i comes from one FMA with
// the round-to-integer constant 1.5 * 2^23 and one subtraction; the constant is read from two
// separate uniform fields so that no compiler can fold the pair away. The terms of S_0 and S_1
// are up to 121 and 40 times the ternary ones, so the difference loses bits; rows 0 and 1
// (DIRECT = 2) therefore accumulate t_0 = R_0 - 3 R_1 and t_1 = R_1 - 3 R_2 directly, which
// leaves an amplification of at most ~8 (row 2) for two more FMAs per byte.

struct Params {
    rows: u32,          // N: rows of this chunk
    groups: u32,        // G = ceil(N / 5)
    row0: u32,          // first row of this chunk in y
    y_stride: u32,      // floats per row of y (all rows of the matrix)
    kp16: u32,          // Kp / 16: vec4<u32> of codes per group
    x_stride4: u32,     // Kp / 4: vec4<f32> per row of x
    nb: u32,            // blocks per row
    log2_b: u32,        // log2(B), B in 32..256
    grid_x: u32,        // workgroups along x: workgroup index = wg.x + wg.y * grid_x
    cols_u16: u32,      // 1 if out_cols is u16
    off_p2_block: u32,
    off_p2_scales: u32,
    off_out_ptr: u32,
    off_out_cols: u32,
    off_out_vals: u32,
    magic_a: f32,       // 12582912.0 (1.5 * 2^23)
    magic_b: f32,       // 12582912.0, a separate field on purpose (see above)
    off_row_scales: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> p2codes: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> aux: array<u32>;

override WG: u32 = 64u;   // threads per workgroup, a power of two
override NB: u32 = 1u;    // batch rows per slice, 1..8
override GPW: u32 = 1u;   // row groups per workgroup, GPW * NB <= 8
override DIRECT: u32 = 2u;   // rows 0 .. DIRECT-1 (at most 2) accumulate t_i directly (see above)

const ROWS: u32 = 5u;
const ACC_N: u32 = 40u;   // >= ROWS * GPW * NB
const GPW_MAX: u32 = 8u;
const ZERO_WORD: u32 = 0x79797979u;   // four code bytes 121: all ternary zeros
const INV3: f32 = 1.0 / 3.0;
const INV9: f32 = 1.0 / 9.0;
const INV27: f32 = 1.0 / 27.0;
const INV81: f32 = 1.0 / 81.0;

var<private> acc: array<f32, ACC_N>;   // [(j * 5 + i) * NB + b]: group j, row i, batch row b
var<private> mag_a: f32;
var<private> mag_b: f32;

fn f16_at(off: u32, i: u32) -> f32 {
    return unpack2x16float(aux[off + (i >> 1u)])[i & 1u];
}

fn u16_at(off: u32, i: u32) -> u32 {
    return (aux[off + (i >> 1u)] >> ((i & 1u) * 16u)) & 0xFFFFu;
}

fn u8_at(off: u32, i: u32) -> f32 {
    return f32((aux[off + (i >> 2u)] >> ((i & 3u) * 8u)) & 0xFFu);
}

// the unit of row r's 8-bit scale codes: row_scales[r] / 256 (exact)
fn row_unit(r: u32) -> f32 {
    return f16_at(P.off_row_scales, r) * (1.0 / 256.0);
}

fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

// s[base + i * NB + b] += sum over the 4 columns of w of R_i(byte) * xq[b][column].
fn dot_word(w: u32, xq: ptr<function, array<vec4<f32>, 8>>, s: ptr<function, array<f32, ACC_N>>, base: u32) {
    for (var m = 0u; m < 4u; m++) {
        let u = bitcast<f32>(((w >> (8u * m)) & 0xFFu) | 0x4B000000u);   // 2^23 + v, exact
        let r0 = u - 8388729.0;                                           // v - 121
        let r1 = fma(r0, INV3, mag_a) - mag_b;
        let r2 = fma(r0, INV9, mag_a) - mag_b;
        let r3 = fma(r0, INV27, mag_a) - mag_b;
        let r4 = fma(r0, INV81, mag_a) - mag_b;
        // rows below DIRECT sum t_i itself: one more FMA per byte and row, float32 accuracy
        let a0 = select(r0, fma(-3.0, r1, r0), DIRECT >= 1u);
        let a1 = select(r1, fma(-3.0, r2, r1), DIRECT >= 2u);
        for (var b = 0u; b < NB; b++) {
            let xv = (*xq)[b][m];
            (*s)[base + b] = fma(a0, xv, (*s)[base + b]);
            (*s)[base + NB + b] = fma(a1, xv, (*s)[base + NB + b]);
            (*s)[base + 2u * NB + b] = fma(r2, xv, (*s)[base + 2u * NB + b]);
            (*s)[base + 3u * NB + b] = fma(r3, xv, (*s)[base + 3u * NB + b]);
            (*s)[base + 4u * NB + b] = fma(r4, xv, (*s)[base + 4u * NB + b]);
        }
    }
}

// acc[(j*5+i)*NB + b] += scale_i * (S_i - 3 S_{i+1}) for the 5 rows; scale(i) per plane.
fn combine(s: ptr<function, array<f32, ACC_N>>, sbase: u32, j: u32, sc: array<f32, 5>) {
    for (var i = 0u; i < ROWS; i++) {
        for (var b = 0u; b < NB; b++) {
            var t = (*s)[sbase + i * NB + b];
            if (i >= DIRECT && i < ROWS - 1u) {
                t = fma(-3.0, (*s)[sbase + (i + 1u) * NB + b], t);
            }
            let a = (j * ROWS + i) * NB + b;
            acc[a] = fma(sc[i], t, acc[a]);
        }
    }
}

// Loop-local arrays are zeroed explicitly: some WGSL compilers hoist a `var` out of the loop
// and initialise it once, not on every iteration.
fn zero_s(s: ptr<function, array<f32, ACC_N>>, n: u32) {
    for (var v = 0u; v < n; v++) {
        (*s)[v] = 0.0;
    }
}

fn load_x(xq: ptr<function, array<vec4<f32>, 8>>, xrow0: u32, xv4: u32) {
    for (var b = 0u; b < NB; b++) {
        (*xq)[b] = x[xrow0 + b * P.x_stride4 + xv4];
    }
}

fn code_vec(g: u32, c: u32) -> vec4<u32> {
    if (g < P.groups && c < P.kp16) {
        return codes[g * P.kp16 + c];
    }
    return vec4<u32>(ZERO_WORD);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let wid = wg.x + wg.y * P.grid_x;
    let g0 = wid * GPW;
    if (g0 >= P.groups) {
        return;
    }
    mag_a = P.magic_a;
    mag_b = P.magic_b;
    let xrow0 = wg.z * NB * P.x_stride4;   // first x row of this batch slice, in vec4
    for (var v = 0u; v < ACC_N; v++) {
        acc[v] = 0.0;
    }

    // ---- plane 1: each thread takes 16 columns of every group, next chunk prefetched
    var wcur: array<vec4<u32>, GPW_MAX>;
    for (var j = 0u; j < GPW; j++) {
        wcur[j] = code_vec(g0 + j, lid);
    }
    for (var c = lid; c < P.kp16; c += WG) {
        var wnext: array<vec4<u32>, GPW_MAX>;
        for (var j = 0u; j < GPW; j++) {
            wnext[j] = code_vec(g0 + j, c + WG);
        }
        var s: array<f32, ACC_N>;
        zero_s(&s, GPW * ROWS * NB);
        var xq: array<vec4<f32>, 8>;
        for (var q = 0u; q < 4u; q++) {
            load_x(&xq, xrow0, c * 4u + q);
            for (var j = 0u; j < GPW; j++) {
                dot_word(wcur[j][q], &xq, &s, j * ROWS * NB);
            }
        }
        let blk = (c * 16u) >> P.log2_b;
        for (var j = 0u; j < GPW; j++) {
            var sc: array<f32, 5>;
            for (var i = 0u; i < ROWS; i++) {
                let r = (g0 + j) * ROWS + i;
                let k = min(r, P.rows - 1u) * P.nb + blk;
                let q = f32((scales[k >> 2u] >> ((k & 3u) * 8u)) & 0xFFu);
                sc[i] = select(0.0, q * row_unit(min(r, P.rows - 1u)), r < P.rows);
            }
            combine(&s, j * ROWS * NB, j, sc);
        }
        wcur = wnext;
    }

    // ---- plane 2: the entries of each group, 16 columns per thread-step
    let sh = P.log2_b - 4u;   // log2(vec4 per entry)
    for (var j = 0u; j < GPW; j++) {
        let g = g0 + j;
        if (g < P.groups) {
            let e0 = aux[g];
            let n = (aux[g + 1u] - e0) << sh;
            for (var t = lid; t < n; t += WG) {
                let e = e0 + (t >> sh);
                let c = t & ((1u << sh) - 1u);
                let blk = u16_at(P.off_p2_block, e);
                let w = p2codes[(e << sh) + c];
                let xv4 = (blk << (P.log2_b - 2u)) + c * 4u;
                var s: array<f32, ACC_N>;
                zero_s(&s, ROWS * NB);
                var xq: array<vec4<f32>, 8>;
                for (var q = 0u; q < 4u; q++) {
                    load_x(&xq, xrow0, xv4 + q);
                    dot_word(w[q], &xq, &s, 0u);
                }
                var sc: array<f32, 5>;
                for (var i = 0u; i < ROWS; i++) {
                    // padding rows have code 0
                    sc[i] = u8_at(P.off_p2_scales, e * ROWS + i) * row_unit(min(g * ROWS + i, P.rows - 1u));
                }
                combine(&s, 0u, j, sc);
            }
        }
    }

    // ---- predators: exact FP16 values at their columns
    for (var j = 0u; j < GPW; j++) {
        for (var i = 0u; i < ROWS; i++) {
            let r = (g0 + j) * ROWS + i;
            if (r < P.rows) {
                let m1 = aux[P.off_out_ptr + r + 1u];
                for (var m = aux[P.off_out_ptr + r] + lid; m < m1; m += WG) {
                    var col: u32;
                    if (P.cols_u16 == 1u) {
                        col = u16_at(P.off_out_cols, m);
                    } else {
                        col = aux[P.off_out_cols + m];
                    }
                    let val = f16_at(P.off_out_vals, m);
                    for (var b = 0u; b < NB; b++) {
                        let a = (j * ROWS + i) * NB + b;
                        acc[a] = fma(val, x_at((xrow0 + b * P.x_stride4) * 4u + col), acc[a]);
                    }
                }
            }
        }
    }

    // ---- one sum per output over the workgroup, one write per output
    let nv = GPW * ROWS * NB;
    reduce_acc(lid, nv);
    for (var v = lid; v < nv; v += WG) {
        let j = v / (ROWS * NB);
        let i = (v / NB) % ROWS;
        let b = v % NB;
        let r = (g0 + j) * ROWS + i;
        if (r < P.rows) {
            y[(wg.z * NB + b) * P.y_stride + P.row0 + r] = red[v];
        }
    }
}
