// reduce_workgroup.wgsl: workgroup sum of per-thread partials through shared memory only, for
// adapters without subgroup operations. Appended to a kernel file (predprey_gemv.wgsl,
// dense_gemv.wgsl) that defines `override WG` (a power of two), `const ACC_N` and
// `var<private> acc: array<f32, ACC_N>`.
//
// reduce_acc(lid, n): every invocation of the workgroup calls it (uniform control flow) with the
// same n <= ACC_N; afterwards red[v] = sum over the workgroup of acc[v] for v < n.
// Workgroup memory: red (ACC_N floats) + scratch (WG * RED_CH floats); RED_CH values are summed
// per round by a tree of log2(WG) barriers.

override RED_CH: u32 = 8u;

var<workgroup> red: array<f32, ACC_N>;
var<workgroup> scratch: array<f32, WG * RED_CH>;

fn reduce_acc(lid: u32, n: u32) {
    for (var v0 = 0u; v0 < n; v0 += RED_CH) {
        let cnt = min(RED_CH, n - v0);
        for (var k = 0u; k < cnt; k++) {
            scratch[k * WG + lid] = acc[v0 + k];
        }
        workgroupBarrier();
        for (var st = WG / 2u; st > 0u; st = st / 2u) {
            if (lid < st) {
                for (var k = 0u; k < cnt; k++) {
                    scratch[k * WG + lid] += scratch[k * WG + lid + st];
                }
            }
            workgroupBarrier();
        }
        if (lid < cnt) {
            red[v0 + lid] = scratch[lid * WG];
        }
        workgroupBarrier();
    }
}
