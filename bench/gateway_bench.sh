#!/usr/bin/env bash
# The gateway benchmark, each figure beside its reference from the same run: commit-to-client
# latency at several connection counts (references: a NOTIFY round trip, and a bare WebSocket
# server sending the same frames at the same rate), fan-out without and
# with row-level security (reference: a bare WebSocket server writing the same frames),
# catch-up of missed changes (reference: sync.changes_since read alone), snapshot streaming
# (reference: COPY TO STDOUT) and resident memory per idle connection. The load generator
# (bench/loadgen) is a separate process; on this machine it shares the cores with the
# gateway and PostgreSQL. Appends JSON lines to $OUT/results.jsonl.
#
# BENCH_SECONDS (default 15): length of the latency and fan-out runs; LATENCY_CONNECTIONS,
# FANOUT_CONNECTIONS, IDLE_CONNECTIONS, SNAPSHOT_ROWS, CATCHUP_CHANGES: sizes (bench-quick
# makes them small).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-15}
OUT=${BENCH_OUT:-bench/results}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh

GATEWAY_PORT=$(free_port)
ADMIN_PORT=$(free_port)
SECRET=bench-secret
# Extra arguments go to the gateway.
start_gateway() {
    target/release/sync-gateway serve "$@" --database-url "host=127.0.0.1 port=$PORT user=sync_gateway dbname=postgres" \
        --authenticator-url "host=127.0.0.1 port=$PORT user=sync_authenticator dbname=postgres" \
        --listen "127.0.0.1:$GATEWAY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --jwt-secret "$SECRET" \
        --default-role app_user --allowed-roles app_user,bench_user --max-subscriptions 100 \
        >"$WORK/gateway.log" 2>&1 &
    GATEWAY_PID=$!
    CLEANUP+=("kill $GATEWAY_PID 2>/dev/null; wait $GATEWAY_PID 2>/dev/null")
    until curl -sf "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null; do sleep 0.1; done
}
restart_gateway() { kill "$GATEWAY_PID"; wait "$GATEWAY_PID" || true; start_gateway "$@"; }
loadgen() {
    target/release/sync-loadgen "$1" --gateway "${TARGET:-127.0.0.1:$GATEWAY_PORT}" \
        --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" --secret "$SECRET" \
        --seconds "$SECONDS_PER_RUN" "${@:2}" | tee -a "$OUT/results.jsonl"
}

loadgen notify
# The latency reference: a bare server sending the same one-change frames at the same rate to
# the connections subscribed to each row, measured as the gateway is, just before it.
BARE_PORT=$(free_port)
target/release/sync-loadgen bare-server --listen "127.0.0.1:$BARE_PORT" --rate 1000 --rows 1000 &
BARE_PID=$!
CLEANUP+=("kill $BARE_PID 2>/dev/null")
start_gateway
# With the gateway's own share of each run (its histograms, scraped before and after).
metrics() { curl -sf "http://127.0.0.1:$ADMIN_PORT/metrics" >"$1"; }
for n in ${LATENCY_CONNECTIONS:-100 1000 10000}; do
    TARGET=127.0.0.1:$BARE_PORT loadgen bare-latency --connections "$n" --ids-per-connection 10 --rows 1000
    metrics "$WORK/metrics.before"
    loadgen latency --connections "$n" --ids-per-connection 10 --rows 1000 --rate 1000
    metrics "$WORK/metrics.after"
    python3 bench/gateway_share.py "$WORK/metrics.before" "$WORK/metrics.after" "$n" | tee -a "$OUT/results.jsonl"
done
kill "$BARE_PID"
FANOUT=${FANOUT_CONNECTIONS:-10000}
loadgen fanout --connections "$FANOUT"
# The reference: a bare server writing frames as large as the gateway's were.
per_frame=$(tail -1 "$OUT/results.jsonl" | python3 -c \
    'import json,sys; r=json.load(sys.stdin); print(max(1, round(r["changes_per_s"] / max(r["messages_per_s"], 1))))')
target/release/sync-loadgen bare-server --listen "127.0.0.1:$BARE_PORT" --changes-per-frame "$per_frame" &
BARE_PID=$!
CLEANUP+=("kill $BARE_PID 2>/dev/null")
sleep 0.5
TARGET=127.0.0.1:$BARE_PORT loadgen bare-fanout --connections "$FANOUT"
kill "$BARE_PID"
# The reference for the RLS rows with one subscriber per claim set below, where each message
# carries about one change: the bare server writing one-change frames to 1,000 connections.
BARE_PORT=$(free_port)
target/release/sync-loadgen bare-server --listen "127.0.0.1:$BARE_PORT" --changes-per-frame 1 &
BARE_PID=$!
CLEANUP+=("kill $BARE_PID 2>/dev/null")
sleep 0.5
TARGET=127.0.0.1:$BARE_PORT loadgen bare-fanout --connections 1000
kill "$BARE_PID"
restart_gateway
loadgen catchup --changes "${CATCHUP_CHANGES:-1000000}"
# Fresh gateways for memory: idle connections, then a 1M-row snapshot's peak.
restart_gateway
loadgen idle --connections "${IDLE_CONNECTIONS:-10000}" --gateway-pid "$GATEWAY_PID"
restart_gateway
ROWS=${SNAPSHOT_ROWS:-1000000}
loadgen snapshot --rows "$ROWS" --gateway-pid "$GATEWAY_PID"
best=$(best_of_3 psql -qAt -c "COPY bench_snapshot TO STDOUT")
echo "{\"mode\": \"copy\", \"rows\": $ROWS, \"seconds\": $best}" | tee -a "$OUT/results.jsonl"
# Cold starts: clients of one audience fetch one table's snapshot at once, from a gateway that
# reads a snapshot for each and from one that shares them (--snapshot-share-for).
COLD="--connections ${COLD_CLIENTS:-200} --rows ${COLD_ROWS:-10000} --admin 127.0.0.1:$ADMIN_PORT"
restart_gateway
loadgen cold-start $COLD
restart_gateway --snapshot-share-for 10s
loadgen cold-start $COLD --shared-snapshots
# Fan-out of a backlog: the changes are written while the gateway is paused (SIGSTOP) and
# read at full speed once it resumes, so that the rows show the gateway's limit: writers
# sharing its two cores committed 25-45k changes/s, less than it delivers. Transactions of
# 1,000 rows. First without RLS, the reference for the rows with it.
BACKLOG=${BACKLOG_CHANGES:-200000}
backlog() { loadgen fanout --backlog --gateway-pid "$GATEWAY_PID" --rows 20000 --rows-per-commit 1000 "$@"; }
restart_gateway
backlog --connections 1000 --changes 20000
# The same at $FANOUT connections, on a table of 2,000 rows: 2,000 changes, as many
# deliveries as the row above at 1,000. The reference of the RLS rows where every subscriber
# sees every change (--rls-one-team).
wide() { loadgen fanout --backlog --gateway-pid "$GATEWAY_PID" --rows 2000 --rows-per-commit 1000 --changes 2000 "$@"; }
wide --connections "$FANOUT"
# The same deliveries as the RLS rows of one subscriber per claim set, without RLS: each
# connection subscribes with a filter on its team instead, the reference of those rows.
backlog --connections 1000 --filter-sets 1000 --changes "$BACKLOG"
backlog --connections "$FANOUT" --filter-sets "$FANOUT" --changes "$BACKLOG"
# Row-level security last: the table keeps its policy from here on. A fresh gateway per
# policy: a policy replaced under running subscriptions sends each a RESYNC.
restart_gateway
backlog --connections 1000 --rls-claim-sets 1000 --changes "$BACKLOG"
backlog --connections 1000 --rls-claim-sets 10 --changes "$((BACKLOG / 10))"
backlog --connections "$FANOUT" --rls-claim-sets "$FANOUT" --changes "$BACKLOG"
# Every subscriber sees every change, through a claim set of its own: the fan-out of the
# no-RLS rows above, with the policy judged for each subscriber.
backlog --connections 1000 --rls-claim-sets 1000 --rls-one-team --changes 20000
restart_gateway
backlog --connections 1000 --rls-claim-sets 1000 --rls-subquery --changes "$BACKLOG"
backlog --connections 1000 --rls-claim-sets 10 --rls-subquery --changes "$((BACKLOG / 10))"
backlog --connections "$FANOUT" --rls-claim-sets "$FANOUT" --rls-subquery --changes "$BACKLOG"
backlog --connections 1000 --rls-claim-sets 1000 --rls-subquery --rls-one-team --changes 20000
wide --connections "$FANOUT" --rls-claim-sets "$FANOUT" --rls-subquery --rls-one-team
# A visibility change without row changes: joining and leaving a project of 1,000 tasks.
restart_gateway
loadgen enter --rows 1000
