// predprey_gemv1.wgsl: the fast kernel, y = W x (and Y = X W^T for small batches) straight from
// the packed format v2 (FORMAT.md). Same bindings, Params and decode
// identity as predprey_gemv.wgsl (its header explains both); this file differs in how work is
// laid out, for throughput on real GPUs:
//   * no private array is indexed inside a loop: the five rows of the group are five scalar
//     accumulators (struct Acc5), the per-byte decode is written out for the four bytes of a word;
//   * one workgroup per row group, WG threads (64..256) over its Kp / 16 vec4<u32> of codes:
//     consecutive threads read consecutive 16 bytes (coalesced), x as vec4<f32> (L1/L2 resident);
//     two chunks per loop iteration with all their loads issued first;
//   * 16 columns of a chunk all lie in one block (B >= 32): their integer-weighted sums are scaled
//     once per chunk and row;
//   * plane 2 and the predators of the group's five rows are one flat list of small items spread
//     over the threads, their CSR pointers read before plane 1 so that their latency is hidden.
//
// Load together with exactly one of reduce_subgroup.wgsl / reduce_workgroup.wgsl (appended
// after this file); it provides `fn reduce_acc(lid: u32, n: u32)` and `red`.
//
// Entry points: `main` (batch 1: one batch row per z slice, NB = 1) and `main4` (batches of 2 and
// more: 4 batch rows per z slice, NB = 4; see there). One workgroup per row group (GPW = 1).
// With INT8, both use x quantized to int8 per 32 columns (binding 7, the CPU int8 kernels' rule,
// docs/kernels.md): every 16-column piece of a plane is one integer sum per row (and batch row)
// made with dot4I8Packed, scaled once; predators still use the float32 x (binding 1), as on the
// CPU.
//
// Buffer layout (as predprey_gemv.wgsl):
//   @binding(0) P        uniform Params.
//   @binding(1) x        f32 [S*NB, Kp] as vec4<f32>: input rows, zero past column K. With XPERM
//                        (the default) each row is chunk-transposed: the j-th vec4 (columns
//                        16c+4j .. 16c+4j+3) of 16-column chunk c sits at vec4 c + j * Kp/16, so
//                        the threads of a subgroup, on consecutive chunks, read consecutive
//                        vec4s (one contiguous span per load instead of a 64-byte stride);
//                        without it, rows are plain (vec4 4c + j).
//   @binding(2) y        f32 [S*NB, P.y_stride]: outputs; this chunk writes row0 .. row0+rows.
//   @binding(3) codes    u8  [G, Kp]   plane-1 codes, base 3 over the 5 rows of a group.
//   @binding(4) scales   u8  [N, nb]   plane-1 block-scale codes (times the row unit, below).
//   @binding(5) p2codes  u8  [E, B]    plane-2 codes of each entry.
//   @binding(6) aux      u32 words: p2_ptr, p2_block, p2_scales, out_ptr, out_cols, out_vals,
//                        row_scales at the word offsets of Params (see predprey_gemv.wgsl).
//   @binding(7) xq       (INT8 only) per batch row, P.xq_stride4 vec4<u32>: Kp int8 codes of x
//                        (plain column order: 16-column chunk c is vec4 c), then Kp / 32 float32
//                        scales (one per 32 columns, as u32 bits), zero-padded to a whole vec4.
// Scales: the five rows' units row_scales[r] / 256 are read once per workgroup (private `ru`);
// a block scale is its 8-bit code times its row's unit.

struct Params {
    rows: u32,
    groups: u32,
    row0: u32,
    y_stride: u32,
    kp16: u32,
    x_stride4: u32,
    nb: u32,
    log2_b: u32,
    grid_x: u32,
    cols_u16: u32,
    off_p2_block: u32,
    off_p2_scales: u32,
    off_out_ptr: u32,
    off_out_cols: u32,
    off_out_vals: u32,
    magic_a: f32,
    magic_b: f32,
    off_row_scales: u32,
    xq_stride4: u32,   // vec4<u32> per batch row of xq (binding 7)
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> codes: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> scales: array<u32>;
@group(0) @binding(5) var<storage, read> p2codes: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> aux: array<u32>;
@group(0) @binding(7) var<storage, read> xq: array<vec4<u32>>;

override WG: u32 = 128u;     // threads per workgroup, a power of two
override DIRECT: u32 = 2u;   // rows 0 .. DIRECT-1 (at most 2) accumulate t_i directly
override XPERM: bool = true; // x rows chunk-transposed (see the buffer layout above)
override INT8: bool = false; // planes 1 and 2 against int8 x (binding 7), in main and main4

const ACC_N: u32 = 20u;      // what the reduction sums: 5 rows (main) or 5 rows x 4 batch rows (main4)
const INV3: f32 = 1.0 / 3.0;
const INV9: f32 = 1.0 / 9.0;
const INV27: f32 = 1.0 / 27.0;
const INV81: f32 = 1.0 / 81.0;

var<private> acc: array<f32, ACC_N>;   // only filled (constant indices) for the reduction: [i * 4 + b]
var<private> mag_a: f32;
var<private> mag_b: f32;
var<private> ru: Acc5;   // units of the scale codes of the group's five rows

struct Acc5 {
    a0: f32,
    a1: f32,
    a2: f32,
    a3: f32,
    a4: f32,
}

// s += R_i(v) * xk (t_i for rows below DIRECT) for one code byte v (0..255, masked by the caller)
fn byte5(v: u32, xk: f32, s: Acc5) -> Acc5 {
    let r0 = bitcast<f32>(v | 0x4B000000u) - 8388729.0;   // v - 121, exact
    let r1 = fma(r0, INV3, mag_a) - mag_b;
    let r2 = fma(r0, INV9, mag_a) - mag_b;
    let r3 = fma(r0, INV27, mag_a) - mag_b;
    let r4 = fma(r0, INV81, mag_a) - mag_b;
    let d0 = select(r0, fma(-3.0, r1, r0), DIRECT >= 1u);
    let d1 = select(r1, fma(-3.0, r2, r1), DIRECT >= 2u);
    return Acc5(fma(d0, xk, s.a0), fma(d1, xk, s.a1), fma(r2, xk, s.a2), fma(r3, xk, s.a3), fma(r4, xk, s.a4));
}

fn word5(w: u32, xv: vec4<f32>, s: Acc5) -> Acc5 {
    var o = byte5(w & 0xFFu, xv.x, s);
    o = byte5((w >> 8u) & 0xFFu, xv.y, o);
    o = byte5((w >> 16u) & 0xFFu, xv.z, o);
    o = byte5(w >> 24u, xv.w, o);
    return o;
}

// 16 columns: codes q against x[xv4 .. xv4+4] (vec4 index), sums per row S_i (t_i below DIRECT)
fn chunk16(q: vec4<u32>, x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> Acc5 {
    var s = Acc5(0.0, 0.0, 0.0, 0.0, 0.0);
    s = word5(q.x, x0, s);
    s = word5(q.y, x1, s);
    s = word5(q.z, x2, s);
    s = word5(q.w, x3, s);
    return s;
}

// a_i += sc_i * t_i with t_i = S_i - 3 S_{i+1} (rows at or past DIRECT; row 4 is S_4 itself)
fn combine(a: Acc5, s: Acc5, c0: f32, c1: f32, c2: f32, c3: f32, c4: f32) -> Acc5 {
    let t0 = select(fma(-3.0, s.a1, s.a0), s.a0, DIRECT >= 1u);
    let t1 = select(fma(-3.0, s.a2, s.a1), s.a1, DIRECT >= 2u);
    let t2 = fma(-3.0, s.a3, s.a2);
    let t3 = fma(-3.0, s.a4, s.a3);
    return Acc5(fma(c0, t0, a.a0), fma(c1, t1, a.a1), fma(c2, t2, a.a2), fma(c3, t3, a.a3), fma(c4, s.a4, a.a4));
}

// ---- int8 activations (INT8). A code byte v gives R_i = round((v - 121) / 3^i) for i = 0..4,
// exactly as in byte5; the rounding adds 1.5 * 2^23 (mag_a), after which the low byte of the
// float's bits is R_i as a two's-complement int8 (|R_i| <= 121). The four bytes of a word give
// four such floats per row, packed into one u32 (pack4xI8 keeps each low byte), and
// dot4I8Packed against 4 int8 x sums R_i x over the word's columns. t_i = R_i - 3 R_{i+1}, so
// the exact integer row sums of a chunk are T_i = S_i - 3 S_{i+1} (T_4 = S_4).

struct I5 {
    a0: i32,
    a1: i32,
    a2: i32,
    a3: i32,
    a4: i32,
}

// R_0 .. R_4 of the four bytes of code word w, each row's four as packed int8
struct R5 {
    p0: u32,
    p1: u32,
    p2: u32,
    p3: u32,
    p4: u32,
}

fn rpack5(w: u32) -> R5 {
    let v = vec4<u32>(w & 0xFFu, (w >> 8u) & 0xFFu, (w >> 16u) & 0xFFu, w >> 24u);
    let r0 = bitcast<vec4<f32>>(v | vec4<u32>(0x4B000000u)) - vec4<f32>(8388729.0);   // v - 121, exact
    let m = vec4<f32>(mag_a);
    return R5(pack4xI8(bitcast<vec4<i32>>(r0 + m)), pack4xI8(bitcast<vec4<i32>>(fma(r0, vec4<f32>(INV3), m))),
              pack4xI8(bitcast<vec4<i32>>(fma(r0, vec4<f32>(INV9), m))), pack4xI8(bitcast<vec4<i32>>(fma(r0, vec4<f32>(INV27), m))),
              pack4xI8(bitcast<vec4<i32>>(fma(r0, vec4<f32>(INV81), m))));
}

fn word_i8(w: u32, xw: u32, s: I5) -> I5 {
    let p = rpack5(w);
    return I5(s.a0 + dot4I8Packed(p.p0, xw), s.a1 + dot4I8Packed(p.p1, xw), s.a2 + dot4I8Packed(p.p2, xw),
              s.a3 + dot4I8Packed(p.p3, xw), s.a4 + dot4I8Packed(p.p4, xw));
}

// 16 columns: codes q against int8 x xv (16 codes), integer sums S_i
fn chunk_i8(q: vec4<u32>, xv: vec4<u32>) -> I5 {
    var s = I5(0, 0, 0, 0, 0);
    s = word_i8(q.x, xv.x, s);
    s = word_i8(q.y, xv.y, s);
    s = word_i8(q.z, xv.z, s);
    s = word_i8(q.w, xv.w, s);
    return s;
}

// a_i += sc_i * xs * T_i: block scales sc, x scale xs of the chunk's 32 columns
fn combine_i8(a: Acc5, s: I5, xs: f32, sc: Acc5) -> Acc5 {
    return Acc5(fma(sc.a0 * xs, f32(s.a0 - 3 * s.a1), a.a0), fma(sc.a1 * xs, f32(s.a1 - 3 * s.a2), a.a1),
                fma(sc.a2 * xs, f32(s.a2 - 3 * s.a3), a.a2), fma(sc.a3 * xs, f32(s.a3 - 3 * s.a4), a.a3),
                fma(sc.a4 * xs, f32(s.a4), a.a4));
}

// x scale of 16-column chunk c in the xq row starting at vec4 qrow
fn sx_at(qrow: u32, c: u32) -> f32 {
    let w = (qrow + P.kp16) * 4u + (c >> 1u);
    return bitcast<f32>(xq[w >> 2u][w & 3u]);
}

// vec4 index, inside a row of x, of columns 16c+4j .. 16c+4j+3 (chunk c, part j)
fn xv(c: u32, j: u32) -> u32 {
    return select(c * 4u + j, c + j * P.kp16, XPERM);
}

// x[col] of the row whose first vec4 is xrow
fn x_col(xrow: u32, col: u32) -> f32 {
    return x[xrow + xv(col >> 4u, (col >> 2u) & 3u)][col & 3u];
}

fn f16_at(off: u32, i: u32) -> f32 {
    let h = unpack2x16float(aux[off + (i >> 1u)]);
    return select(h.x, h.y, (i & 1u) == 1u);
}

fn code_at(k: u32) -> f32 {
    return f32((scales[k >> 2u] >> ((k & 3u) * 8u)) & 0xFFu);
}

fn u8_at(off: u32, i: u32) -> f32 {
    return f32((aux[off + (i >> 2u)] >> ((i & 3u) * 8u)) & 0xFFu);
}

// ru for the group whose first row is rb (rows clamped to the chunk)
fn units5(rb: u32) -> Acc5 {
    let last = P.rows - 1u;
    let o = P.off_row_scales;
    let k = 1.0 / 256.0;
    return Acc5(f16_at(o, min(rb, last)) * k, f16_at(o, min(rb + 1u, last)) * k, f16_at(o, min(rb + 2u, last)) * k,
                f16_at(o, min(rb + 3u, last)) * k, f16_at(o, min(rb + 4u, last)) * k);
}

// plane-2 scales of entry e's five rows (padding rows have code 0)
fn p2scales5(e: u32) -> Acc5 {
    let so = P.off_p2_scales;
    return Acc5(u8_at(so, e * 5u) * ru.a0, u8_at(so, e * 5u + 1u) * ru.a1, u8_at(so, e * 5u + 2u) * ru.a2,
                u8_at(so, e * 5u + 3u) * ru.a3, u8_at(so, e * 5u + 4u) * ru.a4);
}

fn u16_at(off: u32, i: u32) -> u32 {
    return (aux[off + (i >> 1u)] >> ((i & 1u) * 16u)) & 0xFFFFu;
}

// plane-1 scales of the group's five rows (first row rb, clamped to the chunk) in block blk
fn scales5(rb: u32, blk: u32) -> Acc5 {
    let last = P.rows - 1u;
    let nb = P.nb;
    return Acc5(code_at(min(rb, last) * nb + blk) * ru.a0, code_at(min(rb + 1u, last) * nb + blk) * ru.a1,
                code_at(min(rb + 2u, last) * nb + blk) * ru.a2, code_at(min(rb + 3u, last) * nb + blk) * ru.a3,
                code_at(min(rb + 4u, last) * nb + blk) * ru.a4);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wg.x + wg.y * P.grid_x;
    if (g >= P.groups) {
        return;
    }
    mag_a = P.magic_a;
    mag_b = P.magic_b;
    ru = units5(g * 5u);
    let xrow = wg.z * P.x_stride4;   // this z slice's x row, in vec4
    let qrow = wg.z * P.xq_stride4;  // its int8 x (INT8), in vec4
    let rb = g * 5u;
    let kp16 = P.kp16;
    let sh4 = P.log2_b - 4u;         // log2(vec4<u32> per block)

    // pointers of the small work (plane 2, predators), read now, used after plane 1
    let e0 = aux[g];
    let e1 = aux[g + 1u];
    let op = P.off_out_ptr;
    let rl = P.rows;
    let m0 = aux[op + rb];
    let p1 = aux[op + min(rb + 1u, rl)];
    let p2 = aux[op + min(rb + 2u, rl)];
    let p3 = aux[op + min(rb + 3u, rl)];
    let p4 = aux[op + min(rb + 4u, rl)];
    let m1 = aux[op + min(rb + 5u, rl)];

    var a = Acc5(0.0, 0.0, 0.0, 0.0, 0.0);

    // ---- plane 1: 16 columns per thread-step, two steps per iteration; every load of both
    // steps is issued (at in-bounds indices) before any arithmetic, only the second step's
    // arithmetic is conditional
    let cb = g * kp16;
    for (var c = lid; c < kp16; c += 2u * WG) {
        let c1 = c + WG;
        let has1 = c1 < kp16;
        let cc1 = select(c, c1, has1);
        let q0 = codes[cb + c];
        let q1 = codes[cb + cc1];
        let sa = scales5(rb, c >> sh4);
        let sb = scales5(rb, cc1 >> sh4);
        if (INT8) {
            let xa = xq[qrow + c];
            let xb = xq[qrow + cc1];
            let fa = sx_at(qrow, c);
            let fb = sx_at(qrow, cc1);
            a = combine_i8(a, chunk_i8(q0, xa), fa, sa);
            if (has1) {
                a = combine_i8(a, chunk_i8(q1, xb), fb, sb);
            }
            continue;
        }
        let xa0 = x[xrow + xv(c, 0u)];
        let xa1 = x[xrow + xv(c, 1u)];
        let xa2 = x[xrow + xv(c, 2u)];
        let xa3 = x[xrow + xv(c, 3u)];
        let xb0 = x[xrow + xv(cc1, 0u)];
        let xb1 = x[xrow + xv(cc1, 1u)];
        let xb2 = x[xrow + xv(cc1, 2u)];
        let xb3 = x[xrow + xv(cc1, 3u)];
        a = combine(a, chunk16(q0, xa0, xa1, xa2, xa3), sa.a0, sa.a1, sa.a2, sa.a3, sa.a4);
        if (has1) {
            a = combine(a, chunk16(q1, xb0, xb1, xb2, xb3), sb.a0, sb.a1, sb.a2, sb.a3, sb.a4);
        }
    }

    // ---- plane 2 entries (B / 16 items each) then predators (one item each), one flat list
    let n2 = (e1 - e0) << sh4;
    let nitems = n2 + (m1 - m0);
    let mask4 = (1u << sh4) - 1u;
    for (var t = lid; t < nitems; t += WG) {
        if (t < n2) {
            let e = e0 + (t >> sh4);
            let c = t & mask4;
            let blk = u16_at(P.off_p2_block, e);
            let q = p2codes[(e << sh4) + c];
            let cc = (blk << sh4) + c;   // chunk index of these 16 columns in the row
            let s2 = p2scales5(e);
            if (INT8) {
                a = combine_i8(a, chunk_i8(q, xq[qrow + cc]), sx_at(qrow, cc), s2);
            } else {
                let s = chunk16(q, x[xrow + xv(cc, 0u)], x[xrow + xv(cc, 1u)], x[xrow + xv(cc, 2u)], x[xrow + xv(cc, 3u)]);
                a = combine(a, s, s2.a0, s2.a1, s2.a2, s2.a3, s2.a4);
            }
        } else {
            let m = m0 + (t - n2);
            var col: u32;
            if (P.cols_u16 == 1u) {
                col = u16_at(P.off_out_cols, m);
            } else {
                col = aux[P.off_out_cols + m];
            }
            let v = f16_at(P.off_out_vals, m) * x_col(xrow, col);
            a.a0 += select(0.0, v, m < p1);
            a.a1 += select(0.0, v, m >= p1 && m < p2);
            a.a2 += select(0.0, v, m >= p2 && m < p3);
            a.a3 += select(0.0, v, m >= p3 && m < p4);
            a.a4 += select(0.0, v, m >= p4);
        }
    }

    // ---- one sum per row over the workgroup, one write per row
    acc[0] = a.a0;
    acc[1] = a.a1;
    acc[2] = a.a2;
    acc[3] = a.a3;
    acc[4] = a.a4;
    reduce_acc(lid, 5u);
    if (lid < 5u) {
        let r = rb + lid;
        if (r < P.rows) {
            y[wg.z * P.y_stride + P.row0 + r] = red[lid];
        }
    }
}

// ---- main4: batches of 2..8 as z slices of 4 batch rows; each row's accumulator is a vec4 over
// the slice's 4 batch rows, so one decode of a code byte feeds 4 x 5 FMAs. Rows of the slice past
// the batch compute on whatever x holds there; the host never reads their outputs.

struct Acc5v {
    a0: vec4<f32>,
    a1: vec4<f32>,
    a2: vec4<f32>,
    a3: vec4<f32>,
    a4: vec4<f32>,
}

fn byte5v(v: u32, xk: vec4<f32>, s: Acc5v) -> Acc5v {
    let r0 = bitcast<f32>(v | 0x4B000000u) - 8388729.0;
    let r1 = fma(r0, INV3, mag_a) - mag_b;
    let r2 = fma(r0, INV9, mag_a) - mag_b;
    let r3 = fma(r0, INV27, mag_a) - mag_b;
    let r4 = fma(r0, INV81, mag_a) - mag_b;
    let d0 = select(r0, fma(-3.0, r1, r0), DIRECT >= 1u);
    let d1 = select(r1, fma(-3.0, r2, r1), DIRECT >= 2u);
    return Acc5v(fma(vec4(d0), xk, s.a0), fma(vec4(d1), xk, s.a1), fma(vec4(r2), xk, s.a2),
                 fma(vec4(r3), xk, s.a3), fma(vec4(r4), xk, s.a4));
}

// one code word (4 columns) against the 4 columns of the 4 batch rows (b0..b3)
fn word5v(w: u32, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>, s: Acc5v) -> Acc5v {
    var o = byte5v(w & 0xFFu, vec4(b0.x, b1.x, b2.x, b3.x), s);
    o = byte5v((w >> 8u) & 0xFFu, vec4(b0.y, b1.y, b2.y, b3.y), o);
    o = byte5v((w >> 16u) & 0xFFu, vec4(b0.z, b1.z, b2.z, b3.z), o);
    o = byte5v(w >> 24u, vec4(b0.w, b1.w, b2.w, b3.w), o);
    return o;
}

// 16 columns (chunk c) of the 4 batch rows starting at vec4 xrow (rows P.x_stride4 apart)
fn chunk16v(q: vec4<u32>, xrow: u32, c: u32) -> Acc5v {
    let st = P.x_stride4;
    let i0 = xrow + xv(c, 0u);
    let i1 = xrow + xv(c, 1u);
    let i2 = xrow + xv(c, 2u);
    let i3 = xrow + xv(c, 3u);
    var s = Acc5v(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));
    s = word5v(q.x, x[i0], x[i0 + st], x[i0 + 2u * st], x[i0 + 3u * st], s);
    s = word5v(q.y, x[i1], x[i1 + st], x[i1 + 2u * st], x[i1 + 3u * st], s);
    s = word5v(q.z, x[i2], x[i2 + st], x[i2 + 2u * st], x[i2 + 3u * st], s);
    s = word5v(q.w, x[i3], x[i3 + st], x[i3 + 2u * st], x[i3 + 3u * st], s);
    return s;
}

fn combinev(a: Acc5v, s: Acc5v, c0: f32, c1: f32, c2: f32, c3: f32, c4: f32) -> Acc5v {
    let t0 = select(fma(vec4(-3.0), s.a1, s.a0), s.a0, DIRECT >= 1u);
    let t1 = select(fma(vec4(-3.0), s.a2, s.a1), s.a1, DIRECT >= 2u);
    let t2 = fma(vec4(-3.0), s.a3, s.a2);
    let t3 = fma(vec4(-3.0), s.a4, s.a3);
    return Acc5v(fma(vec4(c0), t0, a.a0), fma(vec4(c1), t1, a.a1), fma(vec4(c2), t2, a.a2),
                 fma(vec4(c3), t3, a.a3), fma(vec4(c4), s.a4, a.a4));
}

fn add_chunkv(a: Acc5v, q: vec4<u32>, xrow: u32, c: u32, rb: u32, blk: u32) -> Acc5v {
    let sc = scales5(rb, blk);
    return combinev(a, chunk16v(q, xrow, c), sc.a0, sc.a1, sc.a2, sc.a3, sc.a4);
}

// ---- main4 with INT8: one packing of a code word feeds the 4 batch rows' dot products
struct I5v {
    a0: vec4<i32>,
    a1: vec4<i32>,
    a2: vec4<i32>,
    a3: vec4<i32>,
    a4: vec4<i32>,
}

fn dot4v(p: u32, xw: vec4<u32>) -> vec4<i32> {
    return vec4<i32>(dot4I8Packed(p, xw.x), dot4I8Packed(p, xw.y), dot4I8Packed(p, xw.z), dot4I8Packed(p, xw.w));
}

fn word_i8v(w: u32, xw: vec4<u32>, s: I5v) -> I5v {
    let p = rpack5(w);
    return I5v(s.a0 + dot4v(p.p0, xw), s.a1 + dot4v(p.p1, xw), s.a2 + dot4v(p.p2, xw), s.a3 + dot4v(p.p3, xw),
               s.a4 + dot4v(p.p4, xw));
}

// chunk c of the 4 batch rows' int8 x (xq rows P.xq_stride4 apart from qrow) against codes q
fn chunk_i8v(q: vec4<u32>, qrow: u32, c: u32) -> I5v {
    let st = P.xq_stride4;
    let x0 = xq[qrow + c];
    let x1 = xq[qrow + st + c];
    let x2 = xq[qrow + 2u * st + c];
    let x3 = xq[qrow + 3u * st + c];
    let z = vec4<i32>(0);
    var s = I5v(z, z, z, z, z);
    s = word_i8v(q.x, vec4<u32>(x0.x, x1.x, x2.x, x3.x), s);
    s = word_i8v(q.y, vec4<u32>(x0.y, x1.y, x2.y, x3.y), s);
    s = word_i8v(q.z, vec4<u32>(x0.z, x1.z, x2.z, x3.z), s);
    s = word_i8v(q.w, vec4<u32>(x0.w, x1.w, x2.w, x3.w), s);
    return s;
}

// a_i += sc_i * xs * T_i per batch row (xs: the 4 rows' x scales of the chunk)
fn combine_i8v(a: Acc5v, s: I5v, xs: vec4<f32>, sc: Acc5) -> Acc5v {
    return Acc5v(fma(sc.a0 * xs, vec4<f32>(s.a0 - 3 * s.a1), a.a0), fma(sc.a1 * xs, vec4<f32>(s.a1 - 3 * s.a2), a.a1),
                 fma(sc.a2 * xs, vec4<f32>(s.a2 - 3 * s.a3), a.a2), fma(sc.a3 * xs, vec4<f32>(s.a3 - 3 * s.a4), a.a3),
                 fma(sc.a4 * xs, vec4<f32>(s.a4), a.a4));
}

fn sx4_at(qrow: u32, c: u32) -> vec4<f32> {
    let st = P.xq_stride4;
    return vec4<f32>(sx_at(qrow, c), sx_at(qrow + st, c), sx_at(qrow + 2u * st, c), sx_at(qrow + 3u * st, c));
}

fn x4_at(xrow: u32, col: u32) -> vec4<f32> {
    let st = P.x_stride4;
    let i = xrow + xv(col >> 4u, (col >> 2u) & 3u);
    let j = col & 3u;
    return vec4(x[i][j], x[i + st][j], x[i + 2u * st][j], x[i + 3u * st][j]);
}

@compute @workgroup_size(WG)
fn main4(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = wg.x + wg.y * P.grid_x;
    if (g >= P.groups) {
        return;
    }
    mag_a = P.magic_a;
    mag_b = P.magic_b;
    ru = units5(g * 5u);
    let xrow = wg.z * 4u * P.x_stride4;   // batch row 0 of this z slice, in vec4
    let qrow = wg.z * 4u * P.xq_stride4;  // its int8 x (INT8), in vec4
    let rb = g * 5u;
    let kp16 = P.kp16;
    let sh4 = P.log2_b - 4u;

    let e0 = aux[g];
    let e1 = aux[g + 1u];
    let op = P.off_out_ptr;
    let rl = P.rows;
    let m0 = aux[op + rb];
    let p1 = aux[op + min(rb + 1u, rl)];
    let p2 = aux[op + min(rb + 2u, rl)];
    let p3 = aux[op + min(rb + 3u, rl)];
    let p4 = aux[op + min(rb + 4u, rl)];
    let m1 = aux[op + min(rb + 5u, rl)];

    var a = Acc5v(vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0), vec4(0.0));

    let cb = g * kp16;
    for (var c = lid; c < kp16; c += WG) {
        if (INT8) {
            a = combine_i8v(a, chunk_i8v(codes[cb + c], qrow, c), sx4_at(qrow, c), scales5(rb, c >> sh4));
        } else {
            a = add_chunkv(a, codes[cb + c], xrow, c, rb, c >> sh4);
        }
    }

    let n2 = (e1 - e0) << sh4;
    let nitems = n2 + (m1 - m0);
    let mask4 = (1u << sh4) - 1u;
    for (var t = lid; t < nitems; t += WG) {
        if (t < n2) {
            let e = e0 + (t >> sh4);
            let c = t & mask4;
            let blk = u16_at(P.off_p2_block, e);
            let q = p2codes[(e << sh4) + c];
            let cc = (blk << sh4) + c;
            let s2 = p2scales5(e);
            if (INT8) {
                a = combine_i8v(a, chunk_i8v(q, qrow, cc), sx4_at(qrow, cc), s2);
            } else {
                a = combinev(a, chunk16v(q, xrow, cc), s2.a0, s2.a1, s2.a2, s2.a3, s2.a4);
            }
        } else {
            let m = m0 + (t - n2);
            var col: u32;
            if (P.cols_u16 == 1u) {
                col = u16_at(P.off_out_cols, m);
            } else {
                col = aux[P.off_out_cols + m];
            }
            let v = f16_at(P.off_out_vals, m) * x4_at(xrow, col);
            let z = vec4(0.0);
            a.a0 += select(z, v, m < p1);
            a.a1 += select(z, v, m >= p1 && m < p2);
            a.a2 += select(z, v, m >= p2 && m < p3);
            a.a3 += select(z, v, m >= p3 && m < p4);
            a.a4 += select(z, v, m >= p4);
        }
    }

    acc[0] = a.a0.x; acc[1] = a.a0.y; acc[2] = a.a0.z; acc[3] = a.a0.w;
    acc[4] = a.a1.x; acc[5] = a.a1.y; acc[6] = a.a1.z; acc[7] = a.a1.w;
    acc[8] = a.a2.x; acc[9] = a.a2.y; acc[10] = a.a2.z; acc[11] = a.a2.w;
    acc[12] = a.a3.x; acc[13] = a.a3.y; acc[14] = a.a3.z; acc[15] = a.a3.w;
    acc[16] = a.a4.x; acc[17] = a.a4.y; acc[18] = a.a4.z; acc[19] = a.a4.w;
    reduce_acc(lid, 20u);
    if (lid < 20u) {
        let r = rb + lid / 4u;
        if (r < P.rows) {
            y[(wg.z * 4u + (lid & 3u)) * P.y_stride + P.row0 + r] = red[lid];
        }
    }
}
