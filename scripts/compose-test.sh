#!/usr/bin/env bash
# The compose test: runs docker-compose.yml on this machine's Docker engine and breaks it.
# Builds the images without a registry (scripts/build-offline-images.sh), starts the whole
# system with the observability profile's Prometheus (the profile's Grafana, collector and
# Jaeger have no Debian package and need a registry), then compose-check walks the loop
# once, submits a stream while every service, NATS and PostgreSQL crash in turn, counts the
# promises, checks that Prometheus scrapes every service and answers every dashboard and
# rule query, and measures throughput. Then the same on docker-compose.cluster.yml (three
# NATS nodes, R3, two replicas of each service), with a NATS node killed and another cut off
# from the network for 30 s among the faults, and throughput with two replicas and with one.
# Tears everything down, volumes included, however it ends. Skipped (exit 0) where no Docker
# engine answers. The single-node run also starts the connectors profile's connect service,
# which must become healthy. CLOSEDLOOP_COMPOSE_RELEASE=1 builds optimised binaries (for figures), and
# CLOSEDLOOP_COMPOSE_THROUGHPUT sets the complaints per throughput measurement (3,000).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'compose-test: %s\n' "$*" >&2; }

if ! docker info >/dev/null 2>&1; then
  log "no Docker engine answers; skipped"
  exit 0
fi
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  log "neither docker compose nor docker-compose is installed"; exit 1
fi

if [ -n "${CLOSEDLOOP_COMPOSE_RELEASE:-}" ]; then
  eval "$(scripts/build-offline-images.sh --release)"
else
  eval "$(scripts/build-offline-images.sh)"
fi
cargo build --locked -p closedloop-e2e --bin compose-check

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export COMPOSE_PROJECT_NAME=closedloop-compose-test
export CLOSEDLOOP_INGEST_GRPC_PORT=$(free_port) CLOSEDLOOP_INGEST_HTTP_PORT=$(free_port)
export CLOSEDLOOP_CLASSIFY_PORT=$(free_port) CLOSEDLOOP_DISPATCH_PORT=$(free_port)
export CLOSEDLOOP_NOTIFY_PORT=$(free_port) CLOSEDLOOP_GATEWAY_PORT=$(free_port)
export CLOSEDLOOP_PROMETHEUS_PORT=$(free_port)

# The compose command of the deployment under test; the trap tears down whichever it is.
deployment=("${compose[@]}")
down() {
  status=$?
  if [ "$status" -ne 0 ]; then
    log "failed; the last of each container's log:"
    "${deployment[@]}" logs --tail=30 >&2 || true
  fi
  "${deployment[@]}" --profile observability --profile connectors down -v --remove-orphans >&2 || true
  exit "$status"
}
trap down EXIT

check() {
  target/debug/compose-check --compose "${deployment[*]}" \
    --ingest "127.0.0.1:$CLOSEDLOOP_INGEST_GRPC_PORT" \
    --dispatch "127.0.0.1:$CLOSEDLOOP_DISPATCH_PORT" \
    --gateway "127.0.0.1:$CLOSEDLOOP_GATEWAY_PORT" "$@"
}
# Complaints in each throughput measurement.
throughput=${CLOSEDLOOP_COMPOSE_THROUGHPUT:-3000}

log "building the Closedloop image"
"${deployment[@]}" build >&2
log "one NATS server: starting, with the observability profile's Prometheus and the connectors"
"${deployment[@]}" up -d >&2
"${deployment[@]}" --profile observability up -d prometheus >&2
# Connect has no platform to call here; healthy shows it runs with its bus permissions.
"${deployment[@]}" --profile connectors up -d connect >&2
check --prometheus "127.0.0.1:$CLOSEDLOOP_PROMETHEUS_PORT" --connectors
check --throughput "$throughput" --label "1 NATS node, R1, 1 replica each"
"${deployment[@]}" --profile observability --profile connectors down -v --remove-orphans >&2

deployment=("${compose[@]}" -f docker-compose.yml -f docker-compose.cluster.yml)
log "three NATS nodes, streams at R3, two replicas of each service: starting"
"${deployment[@]}" up -d >&2
"${deployment[@]}" --profile observability up -d prometheus >&2
# Longer than the faults, the last of which cuts a node off for 30 s.
check --cluster --complaints 2400 --prometheus "127.0.0.1:$CLOSEDLOOP_PROMETHEUS_PORT"
check --cluster --throughput "$throughput" --label "3 NATS nodes, R3, 2 replicas each"
"${deployment[@]}" stop ingest-2 classify-2 dispatch-2 notify-2 >&2
check --throughput "$throughput" --label "3 NATS nodes, R3, 1 replica each"
"${deployment[@]}" --profile observability --profile connectors down -v --remove-orphans >&2

# What replication costs: the same three nodes with one copy of each stream.
log "three NATS nodes, streams at R1, one replica of each service: starting"
CLOSEDLOOP_STREAM_REPLICAS=1 "${deployment[@]}" up -d nats nats-2 nats-3 ingest classify dispatch notify >&2
check --throughput "$throughput" --label "3 NATS nodes, R1, 1 replica each"
