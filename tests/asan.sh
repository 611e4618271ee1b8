#!/usr/bin/env bash
# The core crate's tests (every kernel level this CPU runs, the quantizer, the file reader with
# its corruption tests) built with AddressSanitizer: an out-of-bounds read or write in the
# unsafe SIMD code, or in the reader on a corrupted file, aborts the run with a report.
# Needs an installed nightly Rust toolchain (`-Zsanitizer` is nightly-only); where there is none,
# prints a SKIPPED line and exits 2 (PREDPREY_REQUIRE_ASAN=1 makes that a failure in run_all.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain="$(rustup toolchain list 2>/dev/null | grep -o '^nightly[^ ]*' | head -n 1 || true)"
if [ -z "$toolchain" ]; then
    echo "SKIPPED AddressSanitizer tests: no nightly Rust toolchain installed (rustup toolchain install nightly)"
    exit 2
fi
host="$(rustc -vV | sed -n 's/^host: //p')"
echo "core tests under AddressSanitizer ($toolchain, $host)"
# --target keeps the sanitizer flags off the build scripts and proc macros; a separate target
# directory keeps the instrumented build apart from the normal one.
RUSTFLAGS="-Zsanitizer=address" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/asan" \
    cargo "+$toolchain" test --release -q -p predprey-core --target "$host" --lib
