#!/usr/bin/env bash
# The whole-loop benchmark: installs nats-server and PostgreSQL if missing, builds the four
# services and the benchmark in release mode, and runs it. Arguments go to `bench-loop`,
# e.g. `scripts/bench-loop.sh --rate 500 --max-complaints 5000`; `--help` lists them.
# Figures print as a table; JSON and an SVG plot go to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
# Only the binaries it runs: every release binary is optimised whole, which is slow to link.
cargo build --release --locked \
    --bin closedloop-ingest --bin closedloop-classify --bin closedloop-dispatch \
    --bin closedloop-notify --bin bench-loop
exec target/release/bench-loop "$@"
