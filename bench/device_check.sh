#!/usr/bin/env bash
# bench/device_check.sh: the GPU check in one go on a machine with an NVIDIA GPU, x86-64 and
# Python 3.12 but no network and no Rust: install the prepared wheels and the Vulkan loader, run
# the GPU tests, bench/gpu_matvec.py and `predprey gpu-check`, print one short table. Typically
# 2-3 minutes; each step has its own time limit (under 5 minutes in all; a step cut short still
# leaves what it had measured: the bench writes its main table before its launch sweep).
#
# Prepare on a build machine, in the repo root (.whl/ and .gl/ are git-ignored):
#   rm -rf .whl && maturin build --release -o .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl wgpu==0.32.0 cffi==2.0.0 pycparser==3.0 rendercanvas==2.7.2
#   mkdir -p .gl /tmp/amd64/partial; o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
# Run there, from the repo root:   bash bench/device_check.sh
# Logs and JSON go to $OUT when it is set (else /tmp/predprey_device_check). PARTS=0 skips the
# last step (the bench on plane 1 alone, + plane 2, + predators, and plain x rows).
set -u -o pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-/tmp/predprey_device_check}
mkdir -p "$out"
say() { echo "== $* ($(($(date +%s) - start)) s)"; }

say "Vulkan / EGL loaders"
if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
export XDG_RUNTIME_DIR=$(mktemp -d)
chmod 700 "$XDG_RUNTIME_DIR"

say "wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check \
    --root-user-action=ignore --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing .whl/*.whl failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1

probe() {
    timeout 60 python3 - <<'EOF'
from predprey_rs import gpu
ads = gpu.list_adapters()
for a in ads:
    print(f"   {a['backend']:7} {a['adapter_type']:13} {a['device']}  subgroups={a['subgroups']}")
raise SystemExit(0 if any(a["adapter_type"] == "DiscreteGPU" for a in ads) else 3)
EOF
}
say "adapters"
nv=/usr/local/nvidia/share
if ! probe && [ -f "$nv/vulkan/icd.d/nvidia_icd.json" ]; then
    echo "   no discrete GPU adapter: pointing the loaders at the NVIDIA driver in $nv"
    export VK_DRIVER_FILES=$nv/vulkan/icd.d/nvidia_icd.json __EGL_VENDOR_LIBRARY_FILENAMES=$nv/glvnd/egl_vendor.d/10_nvidia.json
    probe || echo "   still no discrete GPU adapter; the checks below run on what there is"
fi

say "GPU tests (PREDPREY_REQUIRE_GPU=1)"
PREDPREY_REQUIRE_GPU=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$out/tests.log" 2>&1
echo "   exit $?: $(tail -n 1 "$out/tests.log")"
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -n 10

# BENCH_ARGS="--quick --shapes 4096x14336 --batches 1" SWEEP= : to try this script on a software adapter
sweep=${SWEEP---sweep}
say "bench/gpu_matvec.py $sweep ${BENCH_ARGS:-}"
timeout 130 python3 bench/gpu_matvec.py $sweep ${BENCH_ARGS:-} --json-out "$out/bench.json" >"$out/bench.txt" 2>"$out/bench.log"
echo "   exit $?"
cat "$out/bench.txt"

say "predprey gpu-check --quick"
timeout 50 python3 -m predprey_rs.cli gpu-check --quick --json >"$out/gpu_check.json" 2>"$out/gpu_check.log"
echo "   exit $?"

say "summary"
python3 - "$out" <<'EOF'
import json, os, re, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
tests = open(os.path.join(out, "tests.log")).read().strip().splitlines()
print(f"GPU tests: {tests[-1] if tests else 'no output'}")
chk = load("gpu_check.json")
if chk:
    for r in chk["adapters"]:
        res = "pass" if r.get("passed") else "FAIL " + (r.get("error") or "; ".join(r.get("failures", []))[:120])
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        err += f" (int8 vs cpu {r['max_rel_err_int8']:.1e})" if "max_rel_err_int8" in r else ""
        gbps = f"{r['gbps']:.3g} GB/s = {r['pct_of_copy']:.0f}% of copy" if "gbps" in r else "-"
        print(f"gpu-check: {r['backend']:7} {r['device'][:32]:32} {r['variant']:9} max rel err {err}  {res}  {gbps}")
else:
    print("gpu-check: no result (see gpu_check.log)")
b = load("bench.json")
if b:
    print(f"bench on {b['adapter']['device']} via {b['adapter']['backend']} ({b['adapter']['kernel_variant']}), "
          f"copy {b['copy_gbps']:.4g} GB/s, per-dispatch floor {b.get('dispatch_floor_us', float('nan')):.2f} us, L2 {b['l2_mb']} MiB:")
    print(f"  {'shape':>10} {'B':>2} {'ours us':>9} {'GB/s':>7} {'%copy':>6} {'copy@size us':>12} {'x dense':>8} {'x torch':>8}"
          f" {'int8 us':>8} {'%copy':>6} {'x dense':>8}")
    for r in b["rows"]:
        xd = f"{r['speedup_vs_dense']:.2f}" if "speedup_vs_dense" in r else "-"
        xt = f"{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
        i8 = (f"{r['int8_us']:8.1f} {r['int8_pct_of_copy']:5.0f}% {r.get('int8_speedup_vs_dense', float('nan')):8.2f}"
              if "int8_us" in r else f"{'-':>8} {'-':>6} {'-':>8}")
        print(f"  {r['shape']:>10} {r['batch']:>2} {r['ours_us']:9.1f} {r['ours_gbps']:7.4g} {r['pct_of_copy']:5.0f}% "
              f"{r.get('copy_at_size_us', float('nan')):12.1f} {xd:>8} {xt:>8} {i8}")
    one = [r for r in b["rows"] if r["batch"] == 1]
    if one:
        pct = min(r["pct_of_copy"] for r in one)
        xd = min((r.get("speedup_vs_dense", 0) for r in one), default=0)
        print(f"goal at batch 1: >= 75% of copy (worst shape {pct:.0f}%), >= 4x dense f16 (worst {xd:.2f}x)")
        if all("int8_us" in r for r in one):
            pct8 = min(r["int8_pct_of_copy"] for r in one)
            xd8 = min((r.get("int8_speedup_vs_dense", 0) for r in one), default=0)
            print(f"  the same with int8 activations: worst {pct8:.0f}% of copy, worst {xd8:.2f}x dense f16")
    seen = set()
    for shape, i8 in ((s["shape"], bool(s.get("int8"))) for s in b.get("sweep", [])):
        if (shape, i8) in seen:
            continue
        seen.add((shape, i8))
        best = min((s for s in b["sweep"] if s["shape"] == shape and bool(s.get("int8")) == i8), key=lambda s: s["us"])
        print(f"  best {'int8' if i8 else 'f32'} launch ({shape}, B=1): fast={best.get('fast', 0)} "
              f"wg={best['wg']} direct={best['direct']} xperm={best.get('xperm', 0)} "
              f"{best['gbps']:.4g} GB/s ({100 * best['gbps'] / b['copy_gbps']:.0f}% of copy)")
else:
    print("bench: no result (see bench.log)")
EOF
# where the time goes by part of the format (plane 1 alone, + plane 2, + predators) and the x
# layout A/B at batch 8, while the time allows (the checks above come first); one shape by
# default (each run makes its own 9 cold matrices: ~10-15 s), PARTS_SHAPES for more
ps=${PARTS_SHAPES:-4096x14336}
if [ "${PARTS:-1}" = "1" ] && [ $(($(date +%s) - start)) -lt 200 ]; then
    for cfg in "0 0" "0.5 0" "0 0.005"; do
        set -- $cfg
        say "parts: plane2=$1 predators=$2"
        timeout 30 python3 bench/gpu_matvec.py --shapes $ps --batches 1 --plane2 $1 \
            --predators $2 --no-dense --no-torch --trials 5 ${PARTS_ARGS:-} >"$out/parts_$1_$2.txt" 2>&1
        grep -E "^ *[0-9]+x[0-9]+ " "$out/parts_$1_$2.txt"
    done
    say "plain x rows (xperm=0), batches 1 and 8"
    PREDPREY_GPU_TUNE=xperm=0 timeout 30 python3 bench/gpu_matvec.py --shapes ${ps%%,*} --batches 1,8 \
        --no-dense --no-torch --no-int8 --trials 5 ${PARTS_ARGS:-} >"$out/xperm0.txt" 2>&1
    grep -E "^ *[0-9]+x[0-9]+ " "$out/xperm0.txt"
fi
say "done"
