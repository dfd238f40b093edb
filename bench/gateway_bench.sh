#!/usr/bin/env bash
# The gateway benchmark: commit-to-client latency with 1,000 subscribed connections at 500
# commits/s, fan-out to 10,000 connections, fan-out with row-level security (1,000
# subscribers in 1,000 and in 10 claim sets), snapshot streaming of 1M rows, and resident
# memory per idle connection. The
# load generator (bench/loadgen) is a separate process; on this machine it shares the cores
# with the gateway and PostgreSQL. Writes bench/results/gateway.md and gateway.jsonl.
#
# BENCH_SECONDS (default 15) is the length of the latency and fan-out runs.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-15}
OUT=bench/results
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
. bench/lib.sh

GATEWAY_PORT=$(free_port)
SECRET=bench-secret
start_gateway() {
    target/release/sync-gateway serve --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" \
        --listen "127.0.0.1:$GATEWAY_PORT" --jwt-secret "$SECRET" --max-subscriptions 100 \
        >"$WORK/gateway.log" 2>&1 &
    GATEWAY_PID=$!
    CLEANUP+=("kill $GATEWAY_PID 2>/dev/null; wait $GATEWAY_PID 2>/dev/null")
    until curl -sf "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null; do sleep 0.1; done
}
loadgen() {
    target/release/sync-loadgen "$1" --gateway "127.0.0.1:$GATEWAY_PORT" \
        --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" --secret "$SECRET" \
        --seconds "$SECONDS_PER_RUN" "${@:2}"
}

: > "$OUT/gateway.jsonl"
start_gateway
loadgen latency --connections 1000 --ids-per-connection 10 --rows 1000 --rate 500 | tee -a "$OUT/gateway.jsonl"
loadgen fanout --connections 10000 | tee -a "$OUT/gateway.jsonl"
# Fresh gateways for memory: idle connections, then a 1M-row snapshot's peak.
restart_gateway() { kill "$GATEWAY_PID"; wait "$GATEWAY_PID" || true; start_gateway; }
restart_gateway
loadgen idle --connections 10000 --gateway-pid "$GATEWAY_PID" | tee -a "$OUT/gateway.jsonl"
restart_gateway
loadgen snapshot --rows "${SNAPSHOT_ROWS:-1000000}" --gateway-pid "$GATEWAY_PID" | tee -a "$OUT/gateway.jsonl"
# Row-level security last: the table keeps its policy from here on.
restart_gateway
loadgen fanout --connections 1000 --rls-claim-sets 1000 | tee -a "$OUT/gateway.jsonl"
loadgen fanout --connections 1000 --rls-claim-sets 10 | tee -a "$OUT/gateway.jsonl"

python3 - "$OUT" <<'PY' > "$OUT/gateway.md"
import json, os, sys
out = sys.argv[1]
all_runs = [json.loads(l) for l in open(os.path.join(out, "gateway.jsonl"))]
runs = {r["mode"]: r for r in all_runs}
lat, idle, snap = runs["latency"], runs["idle"], runs["snapshot"]
fan = next(r for r in all_runs if r["mode"] == "fanout" and r["rls_claim_sets"] == 0)
rls = [r for r in all_runs if r["mode"] == "fanout" and r["rls_claim_sets"] > 0]
mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print("# Gateway benchmark\n")
print(f"Machine: {os.cpu_count()} cores ({mem:.0f} GiB), shared by PostgreSQL, the gateway and the "
      "load generator (a separate process). Release builds; durable commits.\n")
print("| figure | measured | target |")
print("| --- | --- | --- |")
print(f"| commit → client latency, {lat['connections']} connections × {lat['ids_per_connection']} rows each, "
      f"{lat['rate']} commits/s ({lat['deliveries']} deliveries) | p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms, "
      f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms | p99 ≤ 50 ms |")
print(f"| fan-out to {fan['connections']} connections subscribed to the whole table "
      f"({fan['commits']} single-row commits in {fan['seconds']} s) | {fan['messages_per_s']:.0f} messages/s, "
      f"{fan['changes_per_s']:.0f} changes/s | ≥ 100k messages/s |")
for r in rls:
    print(f"| fan-out with RLS: {r['connections']} subscribers in {r['rls_claim_sets']} claim sets "
          f"({r['commits']} commits in {r['seconds']} s) | {r['changes_per_s']:.0f} changes/s in "
          f"{r['messages_per_s']:.0f} messages/s | ≥ 30k messages/s with 1,000 claim sets |")
print(f"| snapshot of {snap['rows']} rows ({snap['megabytes']} MB of NDJSON) | {snap['rows_per_s']:.0f} rows/s "
      f"({snap['seconds']} s); gateway peak RSS {snap['gateway_peak_rss_kib'] // 1024} MiB "
      f"(before: {snap['gateway_rss_before_kib'] // 1024} MiB) | memory bounded |")
print(f"| resident memory per idle connection ({idle['connections']} connections, one subscription each) | "
      f"{idle['kib_per_connection']} KiB | ≤ 32 KiB |")
PY
cat "$OUT/gateway.md"
