#!/usr/bin/env bash
# The core crate's unsafe code that Miri can interpret, checked for undefined behaviour and
# data races: the thread team (atomics, a lifetime-extended task pointer, park/unpark), the
# file reader, and the scalar kernels on invalid and corrupted matrices (under Miri no SIMD
# level is detected, so only the scalar reference runs; the SIMD kernels are covered by
# tests/asan.sh). Needs the nightly toolchain's `miri` component
# (`rustup +nightly component add miri rust-src`); without it, prints a SKIPPED line and exits 2
# (PREDPREY_REQUIRE_MIRI=1 makes that a failure in run_all.sh). A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain="$(rustup toolchain list 2>/dev/null | grep -o '^nightly[^ ]*' | head -n 1 || true)"
if [ -z "$toolchain" ] || ! cargo "+$toolchain" miri --version >/dev/null 2>&1; then
    echo "SKIPPED Miri tests: no nightly toolchain with the miri component (rustup +nightly component add miri rust-src)"
    exit 2
fi
echo "core tests under Miri ($toolchain)"
# Tree Borrows: crossbeam-epoch (under rayon) breaks the stricter Stacked Borrows model;
# permissive provenance: its integer-to-pointer casts; ignore leaks: the team's helper threads
# live for the whole process.
MIRIFLAGS="-Zmiri-tree-borrows -Zmiri-permissive-provenance -Zmiri-ignore-leaks" \
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri" \
    cargo "+$toolchain" miri test -q -p predprey-core --lib -- \
        cpu::team:: format:: \
        cpu::tests::invalid_matrices_never_panic cpu::tests::corrupted_files_load_or_fail_cleanly \
        cpu::tests::shape_errors_before_work cpu::tests::quantize_chunk_rule cpu::tests::non_finite_x_shows_in_y
