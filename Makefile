# pg_sync: the two commands (`make run`, `make test`) and their helpers.
# Every target that needs the toolchain runs `setup` first, which installs what is missing.

# bash: `make soak` reads the oracle's exit status through a pipe (PIPESTATUS).
SHELL          := /bin/bash
PG_CONFIG      ?= /usr/bin/pg_config
CARGO          ?= cargo
# pgrx's own test cluster; its parent must belong to the postgres user.
PGRX_TEST_ROOT ?= /tmp/pg_sync_pgrx_test

.PHONY: setup install client test test-ext test-client test-e2e run run-cluster bench bench-quick fuzz soak lint fmt clean

setup:
	@scripts/setup.sh

## install: build the extension (release) and install it into the system PostgreSQL 15
install: setup
	$(CARGO) pgrx install --release --pg-config $(PG_CONFIG) -p pg_sync_ext
	@# The previous versions' scripts, for `CREATE EXTENSION pg_sync VERSION '0.1.0'` (the
	@# upgrade tests); pgrx installs the upgrade scripts itself.
	install -m 644 pg_sync_ext/sql/history/pg_sync--*.sql $$($(PG_CONFIG) --sharedir)/extension/

## client: build the TypeScript client and the demo app (clients/typescript/dist)
client: setup
	cd clients/typescript && npm run build

## test: every test: the extension's pgrx tests, the client's unit tests, unit tests,
## end-to-end tests on real clusters (with the client in headless Chromium)
test: setup test-ext test-client test-e2e

test-client: client
	cd clients/typescript && npm run check && npm test

test-ext:
	install -d -o postgres -g postgres $(PGRX_TEST_ROOT)
	$(CARGO) pgrx test pg15 -p pg_sync_ext --runas postgres --pgdata $(PGRX_TEST_ROOT)/data

test-e2e: install client
	$(CARGO) build -p sync-gateway
	$(CARGO) test

## run: a local cluster under ./.pgdata with the demo schema tracked, and the gateway; Ctrl-C stops both
run: install client
	$(CARGO) build --release -p sync-gateway
	@scripts/run.sh

## run-cluster: the scaled-out shape on one machine: a primary, a streaming hot standby, a
## gateway on each (one reading from the standby) and nginx in front (docs/deployment.md)
run-cluster: install client
	$(CARGO) build --release -p sync-gateway
	@scripts/run-cluster.sh

## bench: every benchmark beside its reference, in one run: bench/results/REPORT.md, the raw
## data (results.jsonl, trigger.csv, bulk.csv, results.json) and latency.svg
bench: install client
	$(CARGO) build --release -p sync-gateway -p sync-loadgen
	rm -f bench/results/results.jsonl
	bench/trigger_bench.sh
	bench/wal_bench.sh
	bench/gateway_bench.sh
	bench/standby_bench.sh
	bench/browser_bench.sh
	bench/page_bench.sh
	python3 bench/report.py bench/results $${BENCH_SECONDS:-15}

## bench-quick: the same suite with small sizes and 3 s runs (a smoke test, about two
## minutes), into target/bench-quick/
QUICK = BENCH_OUT=target/bench-quick BENCH_SECONDS=3 TRIGGER_ROWS=10000 WAL_CHANGES=20000 \
	LATENCY_CONNECTIONS="100 1000" FANOUT_CONNECTIONS=1000 IDLE_CONNECTIONS=1000 \
	SNAPSHOT_ROWS=100000 CATCHUP_CHANGES=100000 BACKLOG_CHANGES=20000 COLD_CLIENTS=50
bench-quick: install client
	$(CARGO) build --release -p sync-gateway -p sync-loadgen
	rm -rf target/bench-quick
	$(QUICK) bench/trigger_bench.sh
	$(QUICK) bench/wal_bench.sh
	$(QUICK) bench/gateway_bench.sh
	$(QUICK) bench/standby_bench.sh
	$(QUICK) bench/browser_bench.sh
	$(QUICK) PAGE_READERS=100 PAGE_CHANGES=2000 bench/page_bench.sh
	python3 bench/report.py target/bench-quick 3

## fuzz: the property tests of the client-facing parsers, new random cases for FUZZ_SECONDS
## (default 60; `make test` runs a short round of 256 cases)
fuzz:
	$(CARGO) test -p sync-gateway --lib --no-run
	@end=$$(( $$(date +%s) + $${FUZZ_SECONDS:-60} )); rounds=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	    out=$$(PROPTEST_CASES=20000 $(CARGO) test -q -p sync-gateway --lib fuzz 2>&1) || \
	        { echo "$$out" | tail -40; echo "fuzz: a case failed (minimal input above)"; exit 1; }; \
	    rounds=$$((rounds + 1)); \
	done; echo "fuzz: $$rounds rounds of 20000 cases per property, no failure"

## soak: the whole-pipeline oracle with new seeds for SOAK_SECONDS (default 300), then the long
## variants of the reliability suite against the release gateway (a 3,000-step convergence run
## under faults, 10,000 idle connections held for a minute, a restart's reconnect storm of
## 10,000 clients), plus the fuzzing run
soak: install fuzz
	$(CARGO) build -p sync-gateway
	$(CARGO) build --release -p sync-gateway
	$(CARGO) test -p pg_sync_tests --test oracle --no-run
	@end=$$(( $$(date +%s) + $${SOAK_SECONDS:-300} )); runs=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	    PG_SYNC_ORACLE_STEPS=$${ORACLE_STEPS:-300} $(CARGO) test -q -p pg_sync_tests --test oracle -- --nocapture 2>&1 \
	        | grep -E '^seed|shrunk|^  |holds|PostgreSQL|panicked' ; \
	    [ $${PIPESTATUS[0]} -eq 0 ] || { echo "soak: the oracle failed (seed and steps above)"; exit 1; }; \
	    runs=$$((runs + 1)); \
	done; echo "soak: $$runs oracle runs of $${ORACLE_STEPS:-300} steps (on the primary and through a standby), every copy equal to what its user may SELECT"
	PG_SYNC_GATEWAY=$(CURDIR)/target/release/sync-gateway PG_SYNC_SOAK=1 \
	    $(CARGO) test -p pg_sync_tests --test convergence --test reliability -- --test-threads 1

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy -p sync-loadgen --all-targets -- -D warnings
	$(CARGO) clippy -p pg_sync_ext --all-targets -- -D warnings
	cd clients/typescript && npm run check

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .pgdata $(PGRX_TEST_ROOT)
