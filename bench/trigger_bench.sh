#!/usr/bin/env bash
# The capture benchmark: pgbench TPS of single-row UPDATE transactions and the time of one
# 100k-row UPDATE, on the same table untracked, tracked by pg_sync, and with the PL/pgSQL
# audit trigger of sql/bench/audit_trigger.sql; durable and with synchronous_commit=off; 2
# and 8 clients. Writes $OUT/trigger.csv and $OUT/bulk.csv.
#
# BENCH_SECONDS (default 20) is the length of each pgbench run.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${BENCH_SECONDS:-20}
ROWS=${TRIGGER_ROWS:-100000}
OUT=${BENCH_OUT:-bench/results}
mkdir -p "$OUT"
. bench/lib.sh
psql -q -v ON_ERROR_STOP=1 -f sql/bench/audit_trigger.sql >/dev/null
for t in plain tracked audit; do
    psql -q -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE TABLE bench_$t (id int PRIMARY KEY, balance int NOT NULL, note text, updated_at timestamptz);
INSERT INTO bench_$t SELECT g, 0, 'row ' || g, now() FROM generate_series(1, $ROWS) g;
SQL
done
psql -q -c "SELECT sync.track('bench_tracked')" >/dev/null
psql -q -c "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON bench_audit FOR EACH ROW EXECUTE FUNCTION bench_audit()"
psql -q -c "VACUUM ANALYZE" >/dev/null

reset_logs() {
    psql -q -c "TRUNCATE sync.change_history; TRUNCATE bench_audit_log" -c "CHECKPOINT" >/dev/null
}

echo "variant,durability,clients,tps" > "$OUT/trigger.csv"
for durability in on off; do
    for clients in 2 8; do
        for t in plain tracked audit; do
            reset_logs
            printf '\\set id random(1, %d)\nUPDATE bench_%s SET balance = balance + 1, updated_at = now() WHERE id = :id;\n' \
                "$ROWS" "$t" > "$WORK/update_$t.sql"
            tps=$(PGOPTIONS="-c synchronous_commit=$durability" pgbench -n -c "$clients" -j "$clients" \
                    -T "$SECONDS_PER_RUN" -f "$WORK/update_$t.sql" 2>&1 \
                  | awk '/^tps = / { printf "%.0f", $3 }')
            echo "$t,$durability,$clients,$tps" | tee -a "$OUT/trigger.csv"
        done
    done
done

echo "variant,seconds" > "$OUT/bulk.csv"
for t in plain tracked audit; do
    best=
    for _ in 1 2 3; do
        reset_logs
        ms=$(psql -qAt -c '\timing on' -c "UPDATE bench_$t SET balance = balance + 1" \
             | awk '/^Time: / { print $2 }')
        best=$(python3 -c "print(min(x for x in [$ms, ${best:-1e12}]))")
    done
    secs=$(python3 -c "print(f'{$best/1000:.2f}')")
    echo "$t,$secs" | tee -a "$OUT/bulk.csv"
done

