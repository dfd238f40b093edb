# pg_sync: the two commands (`make run`, `make test`) and their helpers.
# Every target that needs the toolchain runs `setup` first, which installs what is missing.

PG_CONFIG      ?= /usr/bin/pg_config
CARGO          ?= cargo
# pgrx's own test cluster; its parent must belong to the postgres user.
PGRX_TEST_ROOT ?= /tmp/pg_sync_pgrx_test

.PHONY: setup install test test-ext test-e2e run bench lint fmt clean

setup:
	@scripts/setup.sh

## install: build the extension (release) and install it into the system PostgreSQL 15
install: setup
	$(CARGO) pgrx install --release --pg-config $(PG_CONFIG) -p pg_sync_ext

## test: every test: the extension's pgrx tests, unit tests, end-to-end tests on real clusters
test: setup test-ext test-e2e

test-ext:
	install -d -o postgres -g postgres $(PGRX_TEST_ROOT)
	$(CARGO) pgrx test pg15 -p pg_sync_ext --runas postgres --pgdata $(PGRX_TEST_ROOT)/data

test-e2e: install
	$(CARGO) build -p sync-gateway
	$(CARGO) test

## run: a local cluster under ./.pgdata with the demo schema tracked, and the gateway; Ctrl-C stops both
run: install
	$(CARGO) build --release -p sync-gateway
	@scripts/run.sh

## bench: the capture benchmark (pgbench) and the gateway benchmark, results in bench/results/
bench: install
	$(CARGO) build --release -p sync-gateway -p sync-loadgen
	@bench/trigger_bench.sh
	@bench/gateway_bench.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy -p sync-loadgen --all-targets -- -D warnings
	$(CARGO) clippy -p pg_sync_ext --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .pgdata $(PGRX_TEST_ROOT)
