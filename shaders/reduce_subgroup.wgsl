// reduce_subgroup.wgsl: workgroup sum of per-thread partials with subgroup operations (needs
// the adapter feature "subgroup"). Appended to a kernel file (predprey_gemv.wgsl,
// dense_gemv.wgsl) that defines `override WG`, `const ACC_N` and
// `var<private> acc: array<f32, ACC_N>`.
//
// reduce_acc(lid, n): every invocation of the workgroup calls it (uniform control flow) with the
// same n <= ACC_N; afterwards red[v] = sum over the workgroup of acc[v] for v < n.
// Each subgroup adds its lanes with subgroupAdd; its first lane takes a slot with an atomic
// (no assumption on how invocations map to subgroups) and stores the n sums there; then the
// slots are added. Workgroup memory: red (ACC_N floats) + SG_SLOTS * ACC_N floats, where
// SG_SLOTS >= WG / (smallest subgroup size of the adapter).

override SG_SLOTS: u32 = 32u;

var<workgroup> red: array<f32, ACC_N>;
var<workgroup> sg_part: array<f32, SG_SLOTS * ACC_N>;
var<workgroup> sg_count: atomic<u32>;

fn reduce_acc(lid: u32, n: u32) {
    // Workgroup memory is not relied on to start zeroed (lavapipe reuses it between workgroups).
    if (lid == 0u) {
        atomicStore(&sg_count, 0u);
    }
    workgroupBarrier();
    let first = subgroupBroadcastFirst(lid) == lid;
    var slot = 0u;
    if (first) {
        slot = atomicAdd(&sg_count, 1u);
    }
    for (var v = 0u; v < n; v++) {
        let s = subgroupAdd(acc[v]);
        if (first) {
            sg_part[slot * ACC_N + v] = s;
        }
    }
    workgroupBarrier();
    let slots = atomicLoad(&sg_count);
    for (var v = lid; v < n; v += WG) {
        var t = 0.0;
        for (var k = 0u; k < slots; k++) {
            t += sg_part[k * ACC_N + v];
        }
        red[v] = t;
    }
    workgroupBarrier();
}
