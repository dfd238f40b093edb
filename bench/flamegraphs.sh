#!/usr/bin/env bash
# Flame graphs of the log's two heavy readers, after the changes of issue 14: the catch-up
# read (sync.changes_since in pages of 10,000 over 200,000 single-row transactions) and WAL
# ingest (sync.ingest_wal of a 200,000-change backlog), each a PostgreSQL backend sampled by
# perf. Writes bench/results/flame-catchup-read.svg and flame-wal-ingest.svg. Needs perf and
# inferno (cargo install inferno); not part of `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null && command -v inferno-flamegraph >/dev/null ||
    { echo "flamegraphs: needs perf and inferno (cargo install inferno)" >&2; exit 1; }
OUT=${BENCH_OUT:-bench/results}
. bench/lib.sh

# Samples the backend of a psql session while it runs $2, into $OUT/flame-$1.svg.
profile() {
    local name=$1 sql=$2 fifo="$WORK/$1.fifo"
    mkfifo "$fifo"
    psql -qAt <"$fifo" >"$WORK/$name.out" &
    local psql_pid=$!
    exec 7>"$fifo"
    echo "SELECT pg_backend_pid() \\g $WORK/$name.pid" >&7
    until [ -s "$WORK/$name.pid" ]; do sleep 0.05; done
    perf record -e cpu-clock -F 999 -g -p "$(cat "$WORK/$name.pid")" -o "$WORK/$name.data" 2>/dev/null &
    local perf_pid=$!
    sleep 0.5 # perf attaches
    echo "$sql" >&7
    echo '\q' >&7
    exec 7>&-
    wait "$psql_pid"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    perf script -i "$WORK/$name.data" 2>/dev/null | inferno-collapse-perf |
        inferno-flamegraph --title "$name" >"$OUT/flame-$name.svg"
    echo "wrote $OUT/flame-$name.svg"
}

psql -q -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
CREATE TABLE flame_read (id int PRIMARY KEY, n int);
SELECT sync.track('flame_read');
INSERT INTO flame_read SELECT g, 0 FROM generate_series(1, 200000) g;
CREATE PROCEDURE flame_writes() LANGUAGE plpgsql AS $$
BEGIN FOR i IN 1..200000 LOOP UPDATE flame_read SET n = n + 1 WHERE id = i; COMMIT; END LOOP; END $$;
CREATE TABLE flame_wal (id int PRIMARY KEY, n int NOT NULL, pad text);
SQL
psql -q -c "TRUNCATE sync.change_history" -c "CALL flame_writes()" >/dev/null
profile catchup-read "DO \$\$ DECLARE c text; r record; n int; BEGIN LOOP
    n := 0;
    FOR r IN SELECT cursor FROM sync.changes_since(c, 10000) LOOP c := r.cursor; n := n + 1; END LOOP;
    EXIT WHEN n < 10000; END LOOP; END \$\$;"
psql -q -c "SELECT sync.track('flame_wal', capture => 'wal')" >/dev/null
psql -q -c "INSERT INTO flame_wal SELECT g, g, repeat('x', 40) FROM generate_series(1, 200000) g" >/dev/null
profile wal-ingest "SELECT sync.ingest_wal(300000);"
