# Two commands set up a fresh machine: `make run` (the local stack) and `make test`.
# Each creates .venv and installs what is missing, then runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format typecheck pytest demo bench tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/llm-worker dev

demo: $(STAMP)
	$(BIN)/llm-worker demo

# promtool (alert rule tests), docker-compose (compose file check) and rabbitmq-server (the
# RabbitMQ broker tests, which start a node of their own, never the machine's) come from
# Debian's packages; install them when missing and possible, else those tests skip saying why.
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null 2>&1)) \
		|| echo "promtool not installed: alert rule tests will skip"; }
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null 2>&1)) \
		|| echo "docker-compose not installed: the compose file check will skip"; }
	@[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null 2>&1)) \
		|| echo "rabbitmq-server not installed: the RabbitMQ broker tests will skip"; }

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench

# Rewrite the code the way `make lint` wants it: fixable lint findings, then the formatter.
format: $(STAMP)
	$(BIN)/ruff check --fix worker tests bench
	$(BIN)/ruff format worker tests bench

typecheck: $(STAMP)
	$(BIN)/mypy worker

# Three test processes, a test file each at a time: most tests wait on real processes (Redis,
# workers, the simulator), so the suite takes about half as long as one process on 2 cores.
# Each process starts its own Redis, simulator and worker. `pytest` alone runs one process.
PYTEST_WORKERS ?= 3

pytest: $(STAMP)
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

test: tools lint typecheck pytest

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
