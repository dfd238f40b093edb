#!/usr/bin/env bash
# `make run`: a local PostgreSQL under ./.pgdata (free port, wal_level=logical, pg_sync
# preloaded) with the extension and the tracked demo schema, and the gateway beside it, until
# Ctrl-C. With SYNC_DATABASE_URL set, that database gets the extension and the demo schema
# instead, and the gateway serves it.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib.sh
DATA="$PWD/.pgdata"
LISTEN=${SYNC_LISTEN:-127.0.0.1:8787}
GATEWAY_PID=

# Starts the gateway on database $1 (a URL it logs in with: as sync_gateway, never a
# superuser), users' queries on $2 (as sync_authenticator), and prints how to use it.
start_gateway() {
    SYNC_DATABASE_URL="$1" SYNC_AUTHENTICATOR_URL="$2" SYNC_LISTEN="$LISTEN" SYNC_DEFAULT_ROLE=app_user SYNC_STATIC_DIR="$DEMO_APP" \
        "$GATEWAY" serve &
    GATEWAY_PID=$!
    local token
    token=$(dev_token)
    cat <<EOF
The demo app (a task board on app.task, the TypeScript client in clients/typescript): open
it in two windows, edit, go offline (DevTools > Network), edit, come back online:

  http://$LISTEN/#token=$token

The gateway listens on ws://$LISTEN/ws/sync (health: http://$LISTEN/healthz, /readyz).
A development token for user "demo", valid 7 days (secret: \$SYNC_JWT_SECRET):

  $token

Watch the demo tasks change, with websocat:

  websocat "ws://$LISTEN/ws/sync?token=$token"
  {"type":"SUBSCRIBE","payload":{"entityCode":"task","mode":"delta"}}

or in a browser console:

  const ws = new WebSocket("ws://$LISTEN/ws/sync?token=$token");
  ws.onmessage = (m) => console.log(JSON.parse(m.data));
  ws.onopen = () => ws.send(JSON.stringify({type: "SUBSCRIBE", payload: {entityCode: "task", mode: "delta"}}));

Ctrl-C stops it.
EOF
}

stop_gateway() {
    if [ -n "$GATEWAY_PID" ]; then
        kill "$GATEWAY_PID" 2>/dev/null || true
        wait "$GATEWAY_PID" 2>/dev/null || true
    fi
}

if [ -n "${SYNC_DATABASE_URL:-}" ]; then
    load_demo "$SYNC_DATABASE_URL"
    echo "pg_sync is installed in $SYNC_DATABASE_URL with the demo schema (app.project, app.task)."
    trap stop_gateway EXIT
    trap 'exit 0' INT TERM
    # The gateway logs in as the role sync_gateway, and its users' queries as
    # sync_authenticator: SYNC_GATEWAY_DATABASE_URL and SYNC_AUTHENTICATOR_URL say how (a
    # password, say); without them, the same URL is used, and a superuser there is refused.
    start_gateway "${SYNC_GATEWAY_DATABASE_URL:-$SYNC_DATABASE_URL}" \
        "${SYNC_AUTHENTICATOR_URL:-${SYNC_GATEWAY_DATABASE_URL:-$SYNC_DATABASE_URL}}"
    wait "$GATEWAY_PID"
    exit 0
fi

if [ ! -s "$DATA/PG_VERSION" ]; then
    pg_dir "$DATA"
    as_pg "$PG_BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
fi

PORT=${PGPORT:-$(free_port)}
pg_start "$DATA" "$PORT"
stop() {
    stop_gateway
    pg_stop "$DATA"
    echo "stopped."
}
trap stop EXIT

URL="postgresql://postgres@127.0.0.1:$PORT/postgres"
load_demo "$URL"
cat <<EOF
pg_sync is running: PostgreSQL 15 on port $PORT, data in $DATA.
The demo tables app.project and app.task are tracked.

  psql "$URL"
  INSERT INTO app.task (project_id, title) VALUES ('p1', 'Try pg_sync');
  SELECT id, op, entity_code, entity_id, data FROM sync.changes_since(NULL);

EOF
trap 'exit 0' INT TERM
start_gateway "postgresql://sync_gateway@127.0.0.1:$PORT/postgres" \
    "postgresql://sync_authenticator@127.0.0.1:$PORT/postgres"
wait "$GATEWAY_PID"
