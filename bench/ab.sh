#!/usr/bin/env bash
# Same-process A/B of the Rust core: REV (default HEAD) against the working tree. See
# bench/ab/src/main.rs for what it prints.
#   bench/ab.sh [REV] compress [ROWS COLS BITS ROUNDS]
#   bench/ab.sh [REV] matvec [ROWS COLS THREADS int8|f32 ROUNDS]
#   PAUSE_MS=10 bench/ab.sh ... matvec ...: blocks of 10 calls after 10 ms pauses
#
# Both versions are exported the same way (REV by `git archive`, the working tree by a copy)
# and the harness is built twice, once with REV as `old` and once with the roles swapped, and
# run in both orders. With one order the crate in the `new` role read up to 7 % slower than
# the same code in the `old` role on the Zen 4 VM (identical code: 0.926-0.997; mostly where
# the matrices landed in memory, which main.rs now balances, partly code placement), which hid
# or invented changes of that size. The last line divides a role bias out: with r1 = REV/tree and
# r2 = tree/REV (each old/new, per-round medians), tree speedup = sqrt(r1 / r2) (> 1: the
# working tree is faster). AB_ONE_WAY=1 runs only the first order (half the time).
set -euo pipefail
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
rev=HEAD
if [[ $# -gt 0 && $1 != compress && $1 != matvec ]]; then rev=$1; shift; fi
work=$root/target/ab
rm -rf "$work/rev" "$work/tree" && mkdir -p "$work/rev" "$work/tree/rust/core"
git -C "$root" archive "$rev" rust/core/src shaders | tar -x -C "$work/rev"
cp -r "$root/rust/core/src" "$work/tree/rust/core/src"
cp -r "$root/shaders" "$work/tree/shaders"
deps=$(sed -n '/^\[workspace.dependencies\]/,/^\[/p' "$root/Cargo.toml" | grep -E '^(half|rayon|safetensors|thiserror|serde_json) ')
# Each version as its own package (no workspace inheritance).
for v in rev tree; do
  cat > "$work/$v/rust/core/Cargo.toml" <<TOML
[package]
name = "predprey-core-$v"
version = "0.0.0"
edition = "2021"
publish = false
[lib]
path = "src/lib.rs"
[dependencies]
$deps
TOML
done
# Harness 1: old = REV, new = working tree; harness 2: the roles swapped.
build() {
  local dir=$work/h$1
  mkdir -p "$dir"
  cat > "$dir/Cargo.toml" <<TOML
[package]
name = "predprey-ab-$1"
version = "0.0.0"
edition = "2021"
publish = false
[[bin]]
name = "predprey-ab-$1"
path = "$root/bench/ab/src/main.rs"
[dependencies]
old = { package = "predprey-core-$2", path = "$work/$2/rust/core" }
new = { package = "predprey-core-$3", path = "$work/$3/rust/core" }
[profile.release]
lto = "thin"
codegen-units = 1
[workspace]
TOML
  cargo build --release -q --manifest-path "$dir/Cargo.toml" --target-dir "$work/target"
}
build 1 rev tree
[[ ${AB_ONE_WAY:-0} == 1 ]] || build 2 tree rev
echo "REV = $(git -C "$root" rev-parse --short "$rev"), tree = working tree" >&2
echo "old = REV, new = tree:" >&2
r1=$("$work/target/release/predprey-ab-1" "$@" | tee /dev/stderr | sed -n 's/.*per round: median \([0-9.]*\).*/\1/p')
[[ ${AB_ONE_WAY:-0} == 1 ]] && exit 0
echo "old = tree, new = REV:" >&2
r2=$("$work/target/release/predprey-ab-2" "$@" | tee /dev/stderr | sed -n 's/.*per round: median \([0-9.]*\).*/\1/p')
python3 -c "import math; r1, r2 = $r1, $r2; print(f'working tree speedup over REV: {math.sqrt(r1 / r2):.3f} (REV/tree {r1:.3f}, tree/REV {r2:.3f}, role bias {1 / math.sqrt(r1 * r2):.3f})')"
