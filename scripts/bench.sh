#!/usr/bin/env bash
# The whole-system benchmarks: installs nats-server and PostgreSQL if missing, builds the four
# services and the benchmark in release mode, and runs it. The first argument names it:
#   scripts/bench.sh loop [--rate 500 --max-complaints 5000]   the whole loop (bench-loop)
#   scripts/bench.sh api [--work-orders 100000 --phase-secs 20] the agent-facing API (bench-api)
# The rest go to the benchmark; `--help` lists them. Figures print as tables; JSON and an
# SVG plot go to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    loop | api) bench="bench-$1" ;;
    *)
        echo "usage: scripts/bench.sh loop|api [ARGS...]" >&2
        exit 2
        ;;
esac
shift
source scripts/install-deps.sh
# Only the binaries it runs: every release binary is optimised whole, which is slow to link.
cargo build --release --locked \
    --bin closedloop-ingest --bin closedloop-classify --bin closedloop-dispatch \
    --bin closedloop-notify --bin "$bench"
exec "target/release/$bench" "$@"
