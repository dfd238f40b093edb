#!/usr/bin/env bash
# The WAL capture benchmark: a backlog of WAL_CHANGES single-row INSERTs (1,000 per
# transaction) on a WAL-captured table, decoded by wal2json alone (peeking the slot with the
# options ingest uses, best of 3) and then stored by sync.ingest_wal (called until it
# returns 0). Appends one JSON line to $OUT/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${BENCH_OUT:-bench/results}
CHANGES=${WAL_CHANGES:-200000}
mkdir -p "$OUT"
. bench/lib.sh

psql -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE TABLE bench_wal (id int PRIMARY KEY, n int NOT NULL, pad text);
SELECT sync.track('bench_wal', capture => 'wal');
SELECT sync.ingest_wal();  -- creates the slot
DO \$\$ BEGIN FOR b IN 0..$((CHANGES / 1000 - 1)) LOOP
    INSERT INTO bench_wal SELECT g, g, repeat('x', 40) FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
    COMMIT;
END LOOP; END \$\$;
SQL
OPTIONS="'format-version', '2', 'include-xids', '1', 'include-lsn', '1', 'include-timestamp', '1',
         'include-pk', '1', 'include-transaction', '1', 'include-type-oids', '1',
         'add-tables', 'public.bench_wal', 'add-msg-prefixes', 'pg_sync'"
raw=$(best_of_3 psql -qAt -c "SELECT count(*) FROM pg_logical_slot_peek_changes('pg_sync', NULL, NULL, $OPTIONS)")
start=$(date +%s.%N)
stored=0
while :; do
    added=$(psql -qAt -c "SELECT sync.ingest_wal(100000)")
    [ "$added" = 0 ] && break
    stored=$((stored + added))
done
ingest=$(python3 -c "print($(date +%s.%N) - $start)")
[ "$stored" = "$CHANGES" ] || { echo "wal bench: stored $stored of $CHANGES changes" >&2; exit 1; }
echo "{\"mode\": \"wal_ingest\", \"changes\": $CHANGES, \"raw_decode_seconds\": $raw, \"ingest_seconds\": $ingest}" \
    | tee -a "$OUT/results.jsonl"
