#!/usr/bin/env bash
# The test command: installs nats-server and PostgreSQL if missing, builds the service
# binaries (the fault tests run them as separate processes and kill them), then runs every
# test: unit tests, and the end-to-end and fault tests, which start their own servers on
# free ports. Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p closedloop-dispatch`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
