#!/usr/bin/env bash
# Installs what pg_sync needs to build and test, skipping what is already there. Idempotent;
# `make setup` runs it, and so do `make test` and `make run` on a new machine.
set -euo pipefail

PGRX_VERSION=0.18.0
# chromium: the browser tests of the TypeScript client (driven by playwright-core); nginx:
# the HTTP cache in front of gateways (tests/tests/pages.rs, make run-cluster).
PACKAGES=(postgresql-15 postgresql-server-dev-15 postgresql-15-wal2json libclang-dev sudo chromium nginx-light)

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs '^pg15 ' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 /usr/bin/pg_config
fi

# The TypeScript client's packages, exactly as the lockfile says (Node 20 or later).
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' 2>/dev/null; then
    echo "setup: the TypeScript client needs Node.js 20 or later (node and npm on the PATH)" >&2
    exit 1
fi
CLIENT=clients/typescript
if [ ! -f "$CLIENT/node_modules/.package-lock.json" ] || [ "$CLIENT/package-lock.json" -nt "$CLIENT/node_modules/.package-lock.json" ]; then
    echo "setup: installing the TypeScript client's packages (npm ci)"
    (cd "$CLIENT" && npm ci --no-audit --no-fund --loglevel=error)
fi
