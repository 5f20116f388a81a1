PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
IMAGE  ?= event-relay:dev

.PHONY: install run test lint unit integration bench image deploy-assets clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/processor demo

lint: install
	$(BIN)/ruff check processor tests $(wildcard bench) deploy
	$(BIN)/hadolint deploy/Dockerfile

test: install lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# the container image; needs a Docker engine (CI has none: the Dockerfile is linted by `make lint`)
image:
	@if docker info >/dev/null 2>&1; then \
		docker build -f deploy/Dockerfile -t $(IMAGE) . ; \
	else \
		echo "make image: no Docker engine reachable here (docker info failed); nothing built." >&2; \
		echo "The Dockerfile is deploy/Dockerfile; build it with: docker build -f deploy/Dockerfile -t $(IMAGE) ." >&2; \
		exit 1; \
	fi

# regenerate the committed Grafana dashboard and PrometheusRule (tests fail while they are stale)
deploy-assets: install
	$(BIN)/python deploy/grafana/build.py
	$(BIN)/python deploy/prometheus/build.py

clean:
	rm -rf $(VENV) build *.egg-info
