# One task runner for people, the README and CI.
PY := .venv/bin/python
# The test suite runs its own stack beside any development stack: other folder, other ports.
TEST_STACK := VIGIL_STACK_DATA_DIR=.vigil-test VIGIL_STACK_MQTT_PORT=21883 \
	VIGIL_STACK_KAFKA_PORT=29092 VIGIL_STACK_KAFKA_CONTROLLER_PORT=29093 \
	VIGIL_STACK_PG_PORT=25432 VIGIL_STACK_SMTP_PORT=20025

.PHONY: setup run test test-unit stack-up stack-down test-stack-down schemas schemas-check lint clean \
	bench-ingest bench-rules bench-notify bench-replay bench-config-reload

setup:
	@bash deploy/local/install.sh

run: setup
	$(PY) -m vigil.cli run

test: setup
	$(TEST_STACK) $(PY) -m pytest

test-unit: setup
	$(PY) -m pytest tests/unit

stack-up: setup
	$(PY) -m vigil.stack up

stack-down:
	$(PY) -m vigil.stack down

test-stack-down:
	$(TEST_STACK) $(PY) -m vigil.stack down

schemas: setup
	$(PY) -m schemas.export
	$(PY) -m schemas.asyncapi

schemas-check: setup
	$(PY) -m schemas.export --check
	$(PY) -m schemas.asyncapi --check

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy services schemas vigil

clean: stack-down test-stack-down
	rm -rf .vigil .vigil-test

# Benchmarks print one JSON line of figures at the end; they are never timed assertions.
bench-ingest: setup
	$(TEST_STACK) $(PY) bench/ingest.py

bench-rules: setup
	$(TEST_STACK) $(PY) bench/rules.py

bench-notify: setup
	$(TEST_STACK) $(PY) bench/notify.py

bench-replay: setup
	$(TEST_STACK) $(PY) bench/replay.py

bench-config-reload: setup
	$(TEST_STACK) $(PY) bench/config_reload.py
