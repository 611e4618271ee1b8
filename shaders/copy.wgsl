// copy.wgsl: dst = src, the achievable-bandwidth reference of bench/gpu_matvec.py and
// `predprey gpu-check` (bytes read + bytes written per second).
//
// Buffer layout:
//   @binding(0) P    uniform CopyParams (below).
//   @binding(1) src  u32 [4 * n4] read as vec4<u32>.
//   @binding(2) dst  u32 [4 * n4] written as vec4<u32>.
// Grid: any number of workgroups (2-D when more than 65535); each invocation copies every
// (threads in the grid)-th vec4, so a launch of fewer threads than vec4s covers the buffer.

struct CopyParams {
    n4: u32,        // vec4<u32> to copy
    grid_x: u32,    // workgroups along x
    threads: u32,   // invocations in the whole grid
    _pad: u32,
}

@group(0) @binding(0) var<uniform> P: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<u32>>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let first = (wg.x + wg.y * P.grid_x) * WG + lid;
    for (var i = first; i < P.n4; i += P.threads) {
        dst[i] = src[i];
    }
}
