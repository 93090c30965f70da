# One task runner for people, the README and CI.
PY := .venv/bin/python
# The test suite runs its own stack beside any development stack: other folder, other ports.
TEST_STACK := VIGIL_STACK_DATA_DIR=.vigil-test VIGIL_STACK_MQTT_PORT=21883 \
	VIGIL_STACK_KAFKA_PORT=29092 VIGIL_STACK_KAFKA_CONTROLLER_PORT=29093 \
	VIGIL_STACK_PG_PORT=25432 VIGIL_STACK_SMTP_PORT=20025

# The benchmarks' stack: its own folder and ports, so what a benchmark registers or leaves on
# its topics never meets the tests (make bench-* then make test passes). Overridable, e.g.
# make bench-config-reload BENCH_STACK="VIGIL_STACK_DATA_DIR=... VIGIL_STACK_MQTT_PORT=...".
BENCH_STACK ?= VIGIL_STACK_DATA_DIR=.vigil-bench VIGIL_STACK_MQTT_PORT=24883 \
	VIGIL_STACK_KAFKA_PORT=24092 VIGIL_STACK_KAFKA_CONTROLLER_PORT=24093 \
	VIGIL_STACK_PG_PORT=24432 VIGIL_STACK_SMTP_PORT=24025

# The TimescaleDB tests' stack: its own folder and ports, and the PostgreSQL named by
# VIGIL_STACK_PG_BIN_DIR (one with TimescaleDB: deploy/timescaledb/build.sh prints it).
TSDB_STACK := VIGIL_STACK_DATA_DIR=.vigil-tsdb VIGIL_STACK_MQTT_PORT=31883 \
	VIGIL_STACK_KAFKA_PORT=39092 VIGIL_STACK_KAFKA_CONTROLLER_PORT=39093 \
	VIGIL_STACK_PG_PORT=35432 VIGIL_STACK_SMTP_PORT=30025
# The storage, replay, end-to-end and API tests: what depends on the database underneath.
TSDB_TESTS := tests/integration tests/e2e tests/api

.PHONY: setup run test test-unit test-faults test-faults-down stack-up stack-down test-stack-down schemas schemas-check lint clean \
	bench-ingest bench-e2e bench-rules bench-notify bench-replay bench-config-reload \
	bench-alarm-burden bench-fhir-export bench-stack-down \
	test-timescale test-timescale-down bench-replay-timescale helm test-deploy

setup:
	@bash deploy/local/install.sh

run: setup
	$(PY) -m vigil_tools.cli run

test: setup
	$(TEST_STACK) $(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

# The pinned helm, built once from its Go module into .tools/ (deploy/helm/install-helm.sh).
helm:
	@bash deploy/helm/install-helm.sh

# The Helm chart (helm lint, helm template), the alerting rules (promtool check and test) and
# the Grafana dashboard, checked against the code; no stack needed.
test-deploy: setup helm
	$(PY) -m pytest tests/unit/test_helm.py tests/unit/test_prometheus_rules.py \
		tests/unit/test_prometheus_rules_dashboard.py

# The fault suite kills its stack's Kafka and stops its PostgreSQL, so it has a stack of its own
# (started by the suite, stopped at its end).
FAULT_STACK := VIGIL_STACK_DATA_DIR=.vigil-faults VIGIL_STACK_MQTT_PORT=22883 \
	VIGIL_STACK_KAFKA_PORT=22092 VIGIL_STACK_KAFKA_CONTROLLER_PORT=22093 \
	VIGIL_STACK_PG_PORT=22432 VIGIL_STACK_SMTP_PORT=22025

# Faults one after another (broker restart and SIGKILL, a broker restart while ingest is away,
# ingest SIGKILL, SIGKILL of each ingest of a share group, Kafka SIGKILL, PostgreSQL down 20 s,
# rules and notify SIGKILL) under paced QoS 1 load from a hub with an outbox, through real
# ingest, rules and notify; after each, a fever that must be paged exactly once; one JSON line
# of figures; fails on a reading answered end to end and not stored or not in Kafka, a reading
# never answered, or a fever not paged exactly once (docs/reliability.md).
test-faults: setup
	$(FAULT_STACK) $(PY) -m tests.fault_suite

test-faults-down:
	$(FAULT_STACK) $(PY) -m vigil_tools.stack down

stack-up: setup
	$(PY) -m vigil_tools.stack up

stack-down:
	$(PY) -m vigil_tools.stack down

test-stack-down:
	$(TEST_STACK) $(PY) -m vigil_tools.stack down

# Skips (exit 0, saying why) when no PostgreSQL with TimescaleDB is named; fails when the named
# one has no TimescaleDB.
test-timescale: setup
	@if [ -z "$(VIGIL_STACK_PG_BIN_DIR)" ]; then \
		echo "test-timescale: SKIPPED: no TimescaleDB PostgreSQL given. Build one with"; \
		echo "  deploy/timescaledb/build.sh <timescaledb-2.28.x source dir>"; \
		echo "and run: VIGIL_STACK_PG_BIN_DIR=<the bin dir it prints> make test-timescale"; \
		exit 0; \
	fi; \
	lib=$$("$(VIGIL_STACK_PG_BIN_DIR)/pg_config" --pkglibdir) && test -f "$$lib/timescaledb.so" \
		|| { echo "test-timescale: no timescaledb.so for $(VIGIL_STACK_PG_BIN_DIR)" >&2; exit 1; }; \
	$(TSDB_STACK) VIGIL_STACK_PG_BIN_DIR="$(VIGIL_STACK_PG_BIN_DIR)" VIGIL_TEST_TIMESCALEDB=1 \
		$(PY) -m pytest $(TSDB_TESTS)

test-timescale-down:
	$(TSDB_STACK) $(PY) -m vigil_tools.stack down

bench-replay-timescale: setup
	@test -n "$(VIGIL_STACK_PG_BIN_DIR)" \
		|| { echo "bench-replay-timescale: set VIGIL_STACK_PG_BIN_DIR (see test-timescale)" >&2; exit 1; }
	$(TSDB_STACK) VIGIL_STACK_PG_BIN_DIR="$(VIGIL_STACK_PG_BIN_DIR)" $(PY) bench/replay.py

schemas: setup
	$(PY) -m schemas.export
	$(PY) -m schemas.asyncapi

schemas-check: setup
	$(PY) -m schemas.export --check
	$(PY) -m schemas.asyncapi --check

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy services schemas vigil vigil_tools

clean: stack-down test-stack-down test-faults-down bench-stack-down
	rm -rf .vigil .vigil-test .vigil-faults .vigil-bench

# Benchmarks print one JSON line of figures at the end; they are never timed assertions.
# The capacity search: offered load stepped up until a loss or a growing backlog; the highest
# sustained zero-loss rate for Vigil and for the mosquitto_sub | Kafka console producer bridge.
# One offered load instead: $(PY) bench/ingest.py --rate 12000 --seconds 20 (with BENCH_STACK).
bench-ingest: setup
	$(BENCH_STACK) $(PY) bench/ingest.py --search $(ARGS)

# Fevers and pump occlusions timed from the MQTT publish to the page accepted by the SMTP and
# the PagerDuty-shaped servers (ingest, rules, notify and the heartbeat as in `vigil run`), on an
# idle pipeline and under a background fleet at 50 % and 90 % of the capacity measured in the
# same run: about 3 min; ARGS="--quick" (fewer injections, shorter steps) under 2 min.
bench-e2e: setup
	$(BENCH_STACK) $(PY) bench/e2e.py $(ARGS)

bench-rules: setup
	$(BENCH_STACK) $(PY) bench/rules.py

bench-notify: setup
	$(BENCH_STACK) $(PY) bench/notify.py

bench-replay: setup
	$(BENCH_STACK) $(PY) bench/replay.py

bench-config-reload: setup
	$(BENCH_STACK) $(PY) bench/config_reload.py

# Seeded home courses (default 10 children x 6 days, on a simulated clock: about 6 min) through
# MQTT, ingest, rules and notify; every page e-mail classified against the ground truth.
# Arguments: make bench-alarm-burden ARGS="--patients 10 --days 2 --seed 2"
bench-alarm-burden: setup
	$(BENCH_STACK) $(PY) bench/alarm_burden.py $(ARGS)

# One 28-day course (readings every 5 min and every minute, 40 alert episodes with their
# pages) exported as FHIR NDJSON through the API's asynchronous $export (docs/fhir.md).
bench-fhir-export: setup
	$(BENCH_STACK) $(PY) bench/fhir_export.py

bench-stack-down:
	$(BENCH_STACK) $(PY) -m vigil_tools.stack down
