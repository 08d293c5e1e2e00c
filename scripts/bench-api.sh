#!/usr/bin/env bash
# The agent-facing API benchmark: installs nats-server and PostgreSQL if missing, builds the
# four services and the benchmark in release mode, and runs it. Arguments go to `bench-api`,
# e.g. `scripts/bench-api.sh --work-orders 100000 --phase-secs 20`; `--help` lists them.
# Figures print as tables; JSON and an SVG go to bench-results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --release --locked \
    --bin closedloop-ingest --bin closedloop-classify --bin closedloop-dispatch \
    --bin closedloop-notify --bin bench-api
exec target/release/bench-api "$@"
