#!/usr/bin/env bash
# `make run-cluster`: the scaled-out shape on one machine, until Ctrl-C (docs/deployment.md).
#
#   browsers ──▶ nginx (HTTP cache, WebSocket proxy) ──┬──▶ gateway A ──────────────▶ primary
#                                                      └──▶ gateway B ─(--read-url)─▶ standby
#                                                                     └─ writes, ticks ─▶ primary
#
# A primary under ./.pgdata-cluster/primary, a streaming hot standby of it under
# ./.pgdata-cluster/standby (pg_basebackup, as the postgres user), a gateway on each, both
# serving the demo app, and nginx in front of both. Kept between runs; `rm -rf
# .pgdata-cluster` starts afresh.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
ROOT="$PWD/.pgdata-cluster"
PRIMARY="$ROOT/primary"
STANDBY="$ROOT/standby"
NGINX="$ROOT/nginx"
FRONT=${SYNC_FRONT:-127.0.0.1:8780}
PIDS=()

stop() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    pg_stop "$STANDBY"
    pg_stop "$PRIMARY"
    echo "stopped."
}
trap stop EXIT

PRIMARY_PORT=$(free_port)
if [ ! -s "$PRIMARY/PG_VERSION" ]; then
    pg_dir "$PRIMARY"
    as_pg "$PG_BIN/initdb" -D "$PRIMARY" -A trust -U postgres >/dev/null
fi
pg_start "$PRIMARY" "$PRIMARY_PORT"
PRIMARY_URL="postgresql://postgres@127.0.0.1:$PRIMARY_PORT/postgres"
load_demo "$PRIMARY_URL"

STANDBY_PORT=$(free_port)
if [ ! -s "$STANDBY/PG_VERSION" ]; then
    pg_dir "$STANDBY"
    # -R: standby.signal and primary_conninfo; the configuration comes along (pg_sync preloaded).
    as_pg "$PG_BIN/pg_basebackup" -D "$STANDBY" -R -X stream --checkpoint=fast -d "host=127.0.0.1 port=$PRIMARY_PORT user=postgres"
fi
# The primary's port changes from run to run: say where it is now.
as_pg sed -i "s/port=[0-9]*/port=$PRIMARY_PORT/" "$STANDBY/postgresql.auto.conf"
pg_start "$STANDBY" "$STANDBY_PORT" "-c hot_standby=on -c hot_standby_feedback=on"

# Gateway A on the primary, gateway B reading from the standby; both log in as sync_gateway
# and run users' queries as sync_authenticator.
at() { echo "postgresql://$1@127.0.0.1:$2/postgres"; }
A=127.0.0.1:$(free_port) B=127.0.0.1:$(free_port)
start_gateway() {
    SYNC_LISTEN="$1" SYNC_ADMIN_LISTEN="127.0.0.1:$(free_port)" SYNC_DEFAULT_ROLE=app_user SYNC_STATIC_DIR="$DEMO_APP" \
        SYNC_DATABASE_URL="$(at sync_gateway "$PRIMARY_PORT")" SYNC_AUTHENTICATOR_URL="$(at sync_authenticator "$PRIMARY_PORT")" \
        "$GATEWAY" serve "${@:2}" &
    PIDS+=($!)
}
start_gateway "$A" --shared-cache --snapshot-share-for 10s
start_gateway "$B" --shared-cache --snapshot-share-for 10s --read-url "$(at sync_gateway "$STANDBY_PORT")"

# nginx in front, configured by docs/nginx.conf: WebSockets proxied to either gateway, change
# pages cached and shared within their audience, everything else passed through.
mkdir -p "$NGINX/tmp" "$NGINX/cache"
chmod -R 777 "$NGINX" # its workers run as nobody when nginx starts as root
sed -e "s|@DIR@|$NGINX|g" -e "s|@LISTEN@|$FRONT|g" -e "s|@GATEWAYS@|server $A; server $B;|g" \
    docs/nginx.conf > "$NGINX/nginx.conf"
nginx -p "$NGINX" -c "$NGINX/nginx.conf" -g 'daemon off;' &
PIDS+=($!)

TOKEN=$(dev_token)
cat <<EOF
pg_sync, scaled out on one machine:
  primary  PostgreSQL 15 on port $PRIMARY_PORT ($PRIMARY)    psql "$PRIMARY_URL"
  standby  streaming hot standby on port $STANDBY_PORT ($STANDBY)
  gateway A http://$A (reads the primary), gateway B http://$B (reads the standby)
  nginx    http://$FRONT in front of both

The demo app through nginx (open two windows: each may land on another gateway):

  http://$FRONT/#token=$TOKEN

A development token for user "demo", valid 7 days: $TOKEN

Ctrl-C stops all of it.
EOF
trap 'exit 0' INT TERM
wait "${PIDS[0]}"
