# Shared by the benchmark scripts: a throwaway cluster with pg_sync preloaded, stopped on exit.
# Sets WORK, PORT and the PG* variables.

PG_BIN=/usr/lib/postgresql/15/bin
WORK=$(mktemp -d /tmp/pg_sync_bench.XXXXXX)
chown postgres:postgres "$WORK" 2>/dev/null || true

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# The shortest wall time, in seconds, of three runs of a command (its output discarded).
best_of_3() {
    local best= start
    for _ in 1 2 3; do
        start=$(date +%s.%N)
        "$@" >/dev/null
        best=$(python3 -c "print(min($(date +%s.%N) - $start, ${best:-1e9}))")
    done
    echo "$best"
}
# A free port below the kernel's ephemeral range (32768 up): one from that range can be taken
# by an outgoing connection while a server restarted on it is down.
free_port() {
    python3 -c '
import random, socket
while True:
    port = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break'
}

PORT=$(free_port)
# WAL capture needs logical decoding, and wal2json listed where the server limits plugins.
PLUGINS=
if "$PG_BIN/postgres" --describe-config | grep output_plugin_libraries >/dev/null; then
    PLUGINS="-c output_plugin_libraries=pgoutput,test_decoding,wal2json"
fi
as_pg "$PG_BIN/initdb" -D "$WORK/data" -A trust -U postgres >/dev/null
as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/log" -w -o \
    "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK \
     -c shared_preload_libraries=pg_sync -c max_wal_size=4GB -c shared_buffers=1GB \
     -c max_connections=200 -c wal_level=logical $PLUGINS" start >/dev/null
CLEANUP=()
cleanup() {
    for c in "${CLEANUP[@]}"; do eval "$c" || true; done
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
# The roles of README's "Setting up a database": the gateway logs in as sync_gateway (no
# superuser, no BYPASSRLS), runs users' queries on sync_authenticator, and acts as
# app_user (or, in the RLS runs, bench_user).
psql -q -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE EXTENSION pg_sync;
CREATE ROLE sync_gateway LOGIN;
SELECT sync.grant_gateway('sync_gateway');
CREATE ROLE app_user NOLOGIN;
CREATE ROLE bench_user NOLOGIN;
CREATE ROLE sync_authenticator LOGIN NOINHERIT;
SELECT sync.grant_authenticator('sync_authenticator');
GRANT app_user, bench_user TO sync_gateway, sync_authenticator;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO app_user;
SQL
