#!/usr/bin/env bash
# The change-page benchmark (the harness of tests/tests/pages.rs, `page_benchmark`): readers
# of one audience catching up one log from one cursor through nginx (docs/nginx.conf) before
# a release gateway, beside the same readers reading the same pages privately from the
# gateway in the same run: seconds, and pages read from the log. Appends a JSON line to
# $OUT/results.jsonl. PAGE_READERS (1000) and PAGE_CHANGES (10000) set the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${BENCH_OUT:-bench/results}
mkdir -p "$OUT"
BENCH_OUT=$(realpath "$OUT") \
    cargo test --release -q -p pg_sync_tests --test pages page_benchmark -- --ignored --nocapture \
    2>&1 | grep -E '^\[pages\]|test result'
