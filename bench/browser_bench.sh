#!/usr/bin/env bash
# The browser benchmark of the TypeScript client, in headless Chromium against a release
# gateway and PostgreSQL (the harness of tests/tests/browser.rs, scenario `bench`): hydration
# of 100,000 rows until the first live query answers, with the rows stored from a Web Worker
# and from the page, and the main thread's longest task meanwhile (reference: the same
# snapshot fetched and parsed in the page alone); the heap of a follower tab holding them;
# commit → live-query callback latency at 1,000 commits/s beside the page's socket latency of
# the same run; and the core bundle's size. Appends JSON lines to $OUT/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${BENCH_OUT:-bench/results}
mkdir -p "$OUT"
(cd clients/typescript && node scripts/size.mjs) | tee -a "$OUT/results.jsonl"
BENCH_OUT=$(realpath "$OUT") BENCH_SECONDS=${BENCH_SECONDS:-15} \
    cargo test --release -q -p pg_sync_tests --test browser browser_benchmark -- --ignored --nocapture \
    2>&1 | grep -E '^\s+\[browser\]|test result'
