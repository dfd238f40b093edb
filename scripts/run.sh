#!/usr/bin/env bash
# `make run`: a local PostgreSQL under ./.pgdata (free port, wal_level=logical, pg_sync
# preloaded) with the extension and the tracked demo schema, until Ctrl-C. With
# SYNC_DATABASE_URL set, that database gets the extension and the demo schema instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=/usr/lib/postgresql/15/bin
DATA="$PWD/.pgdata"

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

load_demo() {
    psql "$1" -v ON_ERROR_STOP=1 -q -c "CREATE EXTENSION IF NOT EXISTS pg_sync" -f sql/demo.sql >/dev/null
}

if [ -n "${SYNC_DATABASE_URL:-}" ]; then
    load_demo "$SYNC_DATABASE_URL"
    echo "pg_sync is installed in $SYNC_DATABASE_URL with the demo schema (app.project, app.task)."
    exit 0
fi

if [ ! -s "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
    if ! as_pg test -w "$DATA"; then
        echo "run: the postgres user cannot write $DATA (a parent directory is closed to it)" >&2
        exit 1
    fi
    as_pg "$PG_BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi

PORT=${PGPORT:-$(free_port)}
as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -o \
    "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$DATA \
     -c wal_level=logical -c max_replication_slots=10 -c shared_preload_libraries=pg_sync" \
    start >/dev/null
stop() { as_pg "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null; echo "stopped."; }
trap stop EXIT

URL="postgresql://postgres@127.0.0.1:$PORT/postgres"
load_demo "$URL"
cat <<EOF
pg_sync is running: PostgreSQL 15 on port $PORT, data in $DATA.
The demo tables app.project and app.task are tracked.

  psql "$URL"
  INSERT INTO app.task (project_id, title) VALUES ('p1', 'Try pg_sync');
  SELECT id, op, entity_code, entity_id, data FROM sync.changes_since(NULL);

Ctrl-C stops it.
EOF
trap 'exit 0' INT TERM
while as_pg "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null; do sleep 1; done
