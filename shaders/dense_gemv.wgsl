// dense_gemv.wgsl: the dense baseline that bench/gpu_matvec.py and `predprey gpu-check` measure
// our kernel against: y = W x from FP16 weights, with the same batch slicing, launch shape and
// reductions as predprey_gemv.wgsl. Load together with one of reduce_subgroup.wgsl /
// reduce_workgroup.wgsl (appended after this file).
//
// Buffer layout (little-endian; f16 element i is the low half of u32 word i/2 when i is even):
//   @binding(0) P   uniform DenseParams (below).
//   @binding(1) x   f32 [S*NB, K] as vec4<f32> (K a multiple of 8).
//   @binding(2) y   f32 [S*NB, P.y_stride]; this dispatch writes row0 .. row0+rows.
//   @binding(3) w   f16 [rows, K] row-major, read as vec4<u32> (8 weights).

struct DenseParams {
    rows: u32,        // rows of W in this binding
    k8: u32,          // K / 8: vec4<u32> per row of w
    x_stride4: u32,   // K / 4: vec4<f32> per row of x
    y_stride: u32,    // floats per row of y
    grid_x: u32,      // workgroups along x
    row0: u32,        // first row in y
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: DenseParams;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

override WG: u32 = 128u;   // threads per workgroup, a power of two
override NB: u32 = 1u;     // batch rows per slice, 1..8
override RPW: u32 = 2u;    // rows per workgroup, RPW * NB <= 40

const ACC_N: u32 = 40u;
var<private> acc: array<f32, ACC_N>;   // [j * NB + b]

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r0 = (wg.x + wg.y * P.grid_x) * RPW;
    if (r0 >= P.rows) {
        return;
    }
    let xrow0 = wg.z * NB * P.x_stride4;
    for (var v = 0u; v < ACC_N; v++) {
        acc[v] = 0.0;
    }
    for (var c = lid; c < P.k8; c += WG) {
        var xa: array<vec4<f32>, 8>;
        var xb: array<vec4<f32>, 8>;
        for (var b = 0u; b < NB; b++) {
            xa[b] = x[xrow0 + b * P.x_stride4 + 2u * c];
            xb[b] = x[xrow0 + b * P.x_stride4 + 2u * c + 1u];
        }
        for (var j = 0u; j < RPW; j++) {
            let r = min(r0 + j, P.rows - 1u);
            let q = w[r * P.k8 + c];
            let lo = vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y));
            let hi = vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w));
            for (var b = 0u; b < NB; b++) {
                acc[j * NB + b] += dot(lo, xa[b]) + dot(hi, xb[b]);
            }
        }
    }
    let nv = RPW * NB;
    reduce_acc(lid, nv);
    for (var v = lid; v < nv; v += WG) {
        let r = r0 + v / NB;
        if (r < P.rows) {
            y[(wg.z * NB + v % NB) * P.y_stride + P.row0 + r] = red[v];
        }
    }
}
