#!/usr/bin/env bash
# The NEON kernels against the scalar reference: the core crate's kernel tests cross-built for
# aarch64 and run under qemu-user, once on an emulated CPU with the dot-product extension
# (`-cpu max`: both NEON levels, `neon-dotprod` and `neon`, are tested) and once without
# (`-cpu cortex-a72`: `neon` is the fastest level there and `neon-dotprod` must not be picked).
# Needs qemu-user, gcc-aarch64-linux-gnu, libc6-dev-arm64-cross (Debian) and rustup's aarch64 std.
# Exit status 2 (and a SKIPPED line) when a prerequisite is missing, non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
for tool in qemu-aarch64 aarch64-linux-gnu-gcc; do
    if ! command -v "$tool" >/dev/null; then
        echo "SKIPPED aarch64 kernel tests: $tool not installed (apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross)"
        exit 2
    fi
done
if ! rustup target list --installed 2>/dev/null | grep -qx "$target" && ! rustup target add "$target" >/dev/null 2>&1; then
    echo "SKIPPED aarch64 kernel tests: could not install rustup's $target standard library"
    exit 2
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for run in max:neon-dotprod cortex-a72:neon; do
    cpu="${run%%:*}"
    echo "aarch64 kernel tests under qemu -cpu $cpu (expecting the ${run#*:} kernel)"
    PREDPREY_EXPECT_KERNEL="${run#*:}" \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
        cargo test --release -q -p predprey-core --target "$target" --lib -- cpu:: f16_conversions
done
