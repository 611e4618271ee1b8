#!/usr/bin/env bash
# Same-process A/B of the Rust core: REV (default HEAD) against the working tree. See
# bench/ab/src/main.rs for what it prints.
#   bench/ab.sh [REV] compress [ROWS COLS BITS ROUNDS]
#   bench/ab.sh [REV] matvec [ROWS COLS THREADS int8|f32 ROUNDS]
#   PAUSE_MS=10 bench/ab.sh ... matvec ...: blocks of 10 calls after 10 ms pauses
set -euo pipefail
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rev=HEAD
if [[ $# -gt 0 && $1 != compress && $1 != matvec ]]; then rev=$1; shift; fi
work=$root/target/ab
rm -rf "$work/old" && mkdir -p "$work/old"
git -C "$root" archive "$rev" rust/core/src shaders | tar -x -C "$work/old"
# The old core as its own package (no workspace inheritance).
cat > "$work/old/rust/core/Cargo.toml" <<TOML
[package]
name = "predprey-core-old"
version = "0.0.0"
edition = "2021"
publish = false
[lib]
name = "old"
path = "src/lib.rs"
[dependencies]
$(sed -n '/^\[workspace.dependencies\]/,/^\[/p' "$root/Cargo.toml" | grep -E '^(half|rayon|safetensors|thiserror|serde_json) ')
TOML
cat > "$work/Cargo.toml" <<TOML
[package]
name = "predprey-ab"
version = "0.0.0"
edition = "2021"
publish = false
[[bin]]
name = "predprey-ab"
path = "$root/bench/ab/src/main.rs"
[dependencies]
new = { package = "predprey-core", path = "$root/rust/core" }
old = { package = "predprey-core-old", path = "$work/old/rust/core" }
[profile.release]
lto = "thin"
codegen-units = 1
[workspace]
TOML
echo "old = $(git -C "$root" rev-parse --short "$rev"), new = working tree" >&2
cargo build --release -q --manifest-path "$work/Cargo.toml" --target-dir "$work/target"
exec "$work/target/release/predprey-ab" "$@"
