#!/usr/bin/env bash
# Runs the whole system without a container engine: installs nats-server and PostgreSQL if
# missing, then starts them (data under .closedloop-local/), a demo channel gateway and the
# four services, and prints where each listens. Ctrl-C stops everything.
# Arguments go to closedloop-local (see `scripts/run-local.sh --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install-deps.sh
exec cargo run --release --locked -p closedloop-e2e --bin closedloop-local -- "$@"
