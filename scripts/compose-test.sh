#!/usr/bin/env bash
# The compose test: runs docker-compose.yml on this machine's Docker engine and breaks it.
# Builds the images without a registry (scripts/build-offline-images.sh), starts the whole
# system with the observability profile's Prometheus (the profile's Grafana, collector and
# Jaeger have no Debian package and need a registry), then compose-check walks the loop
# once, submits a stream while every service, NATS and PostgreSQL crash in turn, counts the
# promises, and checks that Prometheus scrapes every service and answers every dashboard
# and rule query. Tears everything down, volumes included, however it ends. Skipped (exit 0)
# where no Docker engine answers.
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

eval "$(scripts/build-offline-images.sh)"
cargo build --locked -p closedloop-e2e --bin compose-check

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export COMPOSE_PROJECT_NAME=closedloop-compose-test
export CLOSEDLOOP_INGEST_GRPC_PORT=$(free_port) CLOSEDLOOP_INGEST_HTTP_PORT=$(free_port)
export CLOSEDLOOP_CLASSIFY_PORT=$(free_port) CLOSEDLOOP_DISPATCH_PORT=$(free_port)
export CLOSEDLOOP_NOTIFY_PORT=$(free_port) CLOSEDLOOP_GATEWAY_PORT=$(free_port)
export CLOSEDLOOP_PROMETHEUS_PORT=$(free_port)

down() {
  status=$?
  if [ "$status" -ne 0 ]; then
    log "failed; the last of each container's log:"
    "${compose[@]}" logs --tail=30 >&2 || true
  fi
  "${compose[@]}" --profile observability down -v --remove-orphans >&2 || true
  exit "$status"
}
trap down EXIT

log "building the Closedloop image"
"${compose[@]}" build >&2
log "starting"
"${compose[@]}" up -d >&2
"${compose[@]}" --profile observability up -d prometheus >&2
target/debug/compose-check --compose "${compose[*]}" \
  --prometheus "127.0.0.1:$CLOSEDLOOP_PROMETHEUS_PORT" \
  --ingest "127.0.0.1:$CLOSEDLOOP_INGEST_GRPC_PORT" \
  --dispatch "127.0.0.1:$CLOSEDLOOP_DISPATCH_PORT" \
  --gateway "127.0.0.1:$CLOSEDLOOP_GATEWAY_PORT"
