#!/usr/bin/env bash
# Reading from a hot standby (`--read-url`), each figure beside the same run through a
# gateway on the primary: catch-up of CATCHUP_CHANGES changes and a snapshot of SNAPSHOT_ROWS
# rows, each with the CPU time the primary spent while it was served (the point of a
# standby: the primary should hardly notice), and commit-to-client latency at
# STANDBY_LATENCY_CONNECTIONS (1,000) connections (the standby adds replication and its replay). Appends
# JSON lines tagged "via": "primary" or "standby" to $OUT/results.jsonl. GATEWAY_LOG_DIR keeps
# the gateways' logs (default: the run's temporary directory, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-15}
OUT=${BENCH_OUT:-bench/results}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh

# The standby: a base backup of the bench cluster, started with the same settings.
STANDBY_PORT=$(free_port)
as_pg "$PG_BIN/pg_basebackup" -D "$WORK/standby" -R -X stream --checkpoint=fast -d "host=127.0.0.1 port=$PORT user=postgres"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/standby" -l "$WORK/standby.log" -w -o \
    "-p $STANDBY_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK \
     -c shared_preload_libraries=pg_sync -c shared_buffers=1GB -c max_connections=200 \
     -c hot_standby=on -c hot_standby_feedback=on" start >/dev/null
CLEANUP+=("as_pg $PG_BIN/pg_ctl -D $WORK/standby -m immediate -w stop >/dev/null 2>&1")
STANDBY_URL="host=127.0.0.1 port=$STANDBY_PORT user=postgres dbname=postgres"

SECRET=bench-secret
# Gateway `$1` ("primary" or "standby"); its port in ${1}_PORT, its pid in ${1}_PID.
start_gateway() {
    local port admin read=()
    port=$(free_port) admin=$(free_port)
    [ "$1" = standby ] && read=(--read-url "host=127.0.0.1 port=$STANDBY_PORT user=sync_gateway dbname=postgres")
    target/release/sync-gateway serve --database-url "host=127.0.0.1 port=$PORT user=sync_gateway dbname=postgres" \
        --authenticator-url "host=127.0.0.1 port=$PORT user=sync_authenticator dbname=postgres" "${read[@]}" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --jwt-secret "$SECRET" \
        --default-role app_user --max-subscriptions 100 --behind-patience 120s \
        >"${GATEWAY_LOG_DIR:-$WORK}/gateway-$1.log" 2>&1 &
    local pid=$!
    CLEANUP+=("kill $pid 2>/dev/null; wait $pid 2>/dev/null")
    until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
    printf -v "${1}_PORT" %s "$port"
    printf -v "${1}_PID" %s "$pid"
}
# A loadgen run through gateway `$1`, its report tagged with it.
loadgen_via() {
    local port="${1}_PORT" pid="${1}_PID"
    target/release/sync-loadgen "$2" --gateway "127.0.0.1:${!port}" --gateway-pid "${!pid}" \
        --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" --secret "$SECRET" \
        --seconds "$SECONDS_PER_RUN" --primary-data "$WORK/data" --replica-url "$STANDBY_URL" "${@:3}" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['via']='$1'; print(json.dumps(r))" \
        | tee -a "$OUT/results.jsonl"
}

# One gateway at a time, so that the primary's CPU is what serving through that one costs.
for via in primary standby; do
    start_gateway "$via"
    loadgen_via "$via" catchup --changes "${CATCHUP_CHANGES:-1000000}"
    loadgen_via "$via" snapshot --rows "${SNAPSHOT_ROWS:-1000000}"
    loadgen_via "$via" latency --connections "${STANDBY_LATENCY_CONNECTIONS:-1000}" --ids-per-connection 10 --rows 1000 --rate 1000
    pid="${via}_PID"
    kill "${!pid}"
    wait "${!pid}" 2>/dev/null || true
done
