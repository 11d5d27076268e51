# Two commands do all the set-up on a fresh machine:
#   make run    venv, dependencies, a local Kafka broker, the gateway and the consumers
#               (foreground; Ctrl-C stops all)
#   make test   the same set-up, then lint, types, import rules and the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-quick fault soak fault-tools kafka-fetch services-install deploy-tools deploy-check kafka-start kafka-stop clean help

help:
	@sed -n '1,5p' Makefile

$(STAMP): pyproject.toml
	@scripts/bootstrap.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

kafka-fetch:
	@scripts/kafka.sh fetch

# PostgreSQL, Redis and Alertmanager for the tests: installed from Debian's packages when missing, up front,
# so no test spends its time limit on apt-get.
services-install:
	@scripts/postgres.sh install
	@scripts/redis.sh install
	@scripts/alertmanager.sh install

run: $(STAMP) kafka-fetch
	@scripts/run.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# kustomize (Go module proxy), promtool (Debian) and a compose client (Go module) for
# tests/test_deploy.py, installed up front (about 3 minutes the first time; .cache/bin).
deploy-tools: $(STAMP)
	@scripts/deploy-check.sh tools

# The deployment checks alone: manifests, alert rules, dashboard, compose file.
deploy-check: $(STAMP)
	@scripts/deploy-check.sh

# Toxiproxy, the fault suite's TCP fault proxy: built from its Go module into .cache/bin
# (once; about 40 s on a fresh machine).
fault-tools:
	@scripts/toxiproxy.sh install

test: $(STAMP) kafka-fetch services-install deploy-tools fault-tools lint
	$(BIN)/pytest

# The fault-injection suite (docs/reliability.md): every scenario under Onoff-like load, all
# processes real on 127.0.0.1, then the checker; writes .data/fault/last-run.json,
# docs/reliability.md and a timeline PNG per scenario. About 25 minutes. make test runs the
# quick subset (tests/test_fault_quick.py).
fault: $(STAMP) kafka-fetch services-install fault-tools
	$(BIN)/python -m tests.fault --report

# The soak (docs/soak.md): 10 minutes at 2,000 events/s (vegeta, open loop) on a fresh cluster,
# RSS and descriptors of every process sampled every 10 s, then the checker; writes
# .data/fault/soak.json, docs/soak.md and docs/soak.png. About 13 minutes; needs a quiet machine.
soak: $(STAMP) kafka-fetch services-install fault-tools
	@scripts/bench-tools.sh
	$(BIN)/python -m tests.fault.soak --report

# Benchmarks (not part of make test): every scenario side by side in one run, results in
# bench/results/. bench-quick is a one-minute smoke run with no thresholds.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) kafka-fetch services-install
	@scripts/bench-tools.sh
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.spool
	$(BIN)/python -m bench.crm

bench-quick: $(BENCH_STAMP) kafka-fetch services-install
	@scripts/bench-tools.sh
	$(BIN)/python -m bench.run --quick
	$(BIN)/python -m bench.spool --quick
	$(BIN)/python -m bench.crm --quick

kafka-start: kafka-fetch
	@scripts/kafka.sh start

kafka-stop:
	@scripts/kafka.sh stop

clean:
	-scripts/kafka.sh stop
	rm -rf $(VENV) .data .mypy_cache .ruff_cache .pytest_cache
