#!/usr/bin/env bash
# Profile-guided release build of the four services (BENCHMARKS.md has what it saves).
#
# 1. builds them instrumented, with the release profile, into target/pgo-train/;
# 2. trains them with one bench-loop run, which starts its own nats-server and PostgreSQL;
# 3. merges the profiles with llvm-profdata (rustup's llvm-tools component, added if missing);
# 4. rebuilds them with the merged profile into target/pgo/.
#
# Every run rebuilds the optimised services in full, since each training gives a new profile.
# The optimised binaries' folder is printed at the end; hand it to the benchmark with
# `scripts/bench.sh loop --bin-dir DIR`, or copy the binaries where they are deployed.
# Extra arguments go to the training bench-loop run. Both builds name a --target so that
# RUSTFLAGS reach only the code that ships, not build scripts and proc macros.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh

host=$(rustc -vV | sed -n 's/^host: //p')
sysroot_bin="$(rustc --print sysroot)/lib/rustlib/$host/bin"
if [[ ! -x "$sysroot_bin/llvm-profdata" ]]; then
  echo "build-pgo: adding rustup's llvm-tools component for llvm-profdata"
  rustup component add llvm-tools
fi

services=(closedloop-ingest closedloop-classify closedloop-dispatch closedloop-notify)
bin_args=()
for service in "${services[@]}"; do bin_args+=(--bin "$service"); done

root=$(pwd)/target
profiles="$root/pgo-train/profiles"
rm -rf "$profiles" "$root"/pgo-train/merged-*.profdata
mkdir -p "$profiles"

echo "build-pgo: 1/4 instrumented build"
RUSTFLAGS="-Cprofile-generate=$profiles" CARGO_TARGET_DIR="$root/pgo-train" \
  cargo build --release --locked --target "$host" "${bin_args[@]}"

echo "build-pgo: 2/4 training run (the benchmark itself, normal release build)"
cargo build --release --locked --bin bench-loop
"$root/release/bench-loop" --bin-dir "$root/pgo-train/$host/release" \
  --out "$root/pgo-train/bench-results" --raw-messages 5000 "$@"

shopt -s nullglob
raw=("$profiles"/*.profraw)
if ((${#raw[@]} == 0)); then
  echo "build-pgo: the training run left no profiles in $profiles" >&2
  exit 1
fi

echo "build-pgo: 3/4 merging ${#raw[@]} profiles"
"$sysroot_bin/llvm-profdata" merge -o "$root/pgo-train/merged.tmp" "${raw[@]}"
# Cargo does not watch the profile's contents, only RUSTFLAGS: naming the file after its
# hash makes a new profile rebuild everything, not only the crates that changed.
hash=$(sha256sum "$root/pgo-train/merged.tmp" | cut -c1-16)
merged="$root/pgo-train/merged-$hash.profdata"
mv "$root/pgo-train/merged.tmp" "$merged"

echo "build-pgo: 4/4 optimised build"
# Code the training never ran counts as cold and is optimised for size, not speed.
RUSTFLAGS="-Cprofile-use=$merged" CARGO_TARGET_DIR="$root/pgo" \
  cargo build --release --locked --target "$host" "${bin_args[@]}"

echo "build-pgo: optimised services in $root/pgo/$host/release"
