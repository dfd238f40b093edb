# Shared by run.sh and run-cluster.sh: PostgreSQL 15 as the postgres user, free ports, the
# demo schema, and the gateway's development token.

PG_BIN=/usr/lib/postgresql/15/bin
GATEWAY=target/release/sync-gateway
DEMO_APP=clients/typescript/dist/demo
export SYNC_JWT_SECRET=${SYNC_JWT_SECRET:-dev-secret-change-me}

# PostgreSQL refuses to run as root: run it as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

load_demo() {
    psql "$1" -v ON_ERROR_STOP=1 -q -c "CREATE EXTENSION IF NOT EXISTS pg_sync" -f sql/demo.sql >/dev/null
}

# A data directory the postgres user owns (0700, as PostgreSQL wants), for initdb or
# pg_basebackup.
pg_dir() {
    mkdir -p "$1"
    chmod 700 "$1"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$1"; fi
    if ! as_pg test -w "$1"; then
        echo "the postgres user cannot write $1 (a parent directory is closed to it)" >&2
        exit 1
    fi
}

# Starts the cluster of data directory $1 on port $2 (pg_sync preloaded, wal_level=logical),
# with further `-c` settings in $3. Its socket and log go beside the data directory ($1.run/),
# so that a base backup of it copies neither.
pg_start() {
    mkdir -p "$1.run"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$1.run"; fi
    # Builds of PostgreSQL that list the allowed output plugins must allow wal2json.
    local plugins=
    if "$PG_BIN/postgres" --describe-config 2>/dev/null | grep -q output_plugin_libraries; then
        plugins="-c output_plugin_libraries=pgoutput,test_decoding,wal2json"
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$1" -l "$1.run/server.log" -w -o \
        "-p $2 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$1.run \
         -c wal_level=logical -c max_replication_slots=10 -c shared_preload_libraries=pg_sync $plugins ${3:-}" \
        start >/dev/null
}

pg_stop() {
    as_pg "$PG_BIN/pg_ctl" -D "$1" -m fast -w stop >/dev/null || true
}

dev_token() {
    "$GATEWAY" token --sub demo --role app_user --ttl 7d
}
