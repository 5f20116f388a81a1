PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
IMAGE  ?= event-relay:dev
# pytest workers of make test and make integration (each starts its own broker, registry stub and sandbox)
PYTEST_WORKERS ?= 2

.PHONY: install system-tools run test lint unit integration tiers bench image deploy-assets clean

# the programs from outside PyPI that `make test` runs: prometheus and promtool (the alert-rule tests and the
# scrape end to end), both in Debian's package `prometheus`. As root they are installed here; otherwise the
# recipe names what to install and fails.
SYSTEM_TOOLS := prometheus promtool
SYSTEM_PACKAGES := prometheus

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory apt-install \
		APT_WHY="$(PYTHON) -m venv (the virtualenv of make install)" APT_PACKAGES=python3-venv
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		$(MAKE) --no-print-directory apt-install APT_WHY="$${missing# }" APT_PACKAGES="$(SYSTEM_PACKAGES)" || exit 1; \
		for t in $$missing; do command -v $$t >/dev/null 2>&1 || { \
			echo "make: $$t is still not on PATH after installing $(SYSTEM_PACKAGES)" >&2; exit 1; }; done; \
	fi

# apt-install APT_PACKAGES=... APT_WHY=...: as root, install the Debian packages (after apt-get update when the
# package lists are missing or stale); otherwise say exactly what to install, and fail
.PHONY: apt-install
apt-install:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make: $(APT_WHY) missing; install the Debian package(s) $(APT_PACKAGES) as root:" >&2; \
		echo "    sudo apt-get install -y --no-install-recommends $(APT_PACKAGES)" >&2; \
		exit 1; \
	fi; \
	echo "make: $(APT_WHY) missing; installing the Debian package(s) $(APT_PACKAGES)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null 2>&1 || { \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; }

run: install
	$(BIN)/processor demo

lint: install
	$(BIN)/ruff check processor tests $(wildcard bench) deploy
	$(BIN)/mypy
	$(BIN)/hadolint deploy/Dockerfile

# the tiers (README "Development"): `unit` is everything but the integration tests (tests/unit, tests/deploy), with
# Hypothesis' fast profile; `integration` the real CLI against the real broker; `test` all of it, as CI runs it,
# and the 15 slowest tests. The integration tests spend most of their time waiting on their processes (streams at
# a set pace, outages of set lengths, kills and restarts): two workers share the slow ones out.
test: install system-tools lint tiers
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal --durations=15

unit: install system-tools
	HYPOTHESIS_PROFILE=fast $(BIN)/pytest -q -p no:cacheprovider -m "not integration" tests/unit tests/deploy

integration: install system-tools
	$(BIN)/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist worksteal -m integration tests/integration

# the markers select what the tiers say, in the real tree: -m "not integration" nothing of tests/integration (so
# -m integration, its complement, all of it), -m integration nothing else
tiers: install
	@fast=$$($(BIN)/pytest --collect-only -q -p no:cacheprovider -m "not integration" | grep '::'); \
	slow=$$($(BIN)/pytest --collect-only -q -p no:cacheprovider -m integration | grep '::'); \
	if printf "%s\n" "$$fast" | grep -q '^tests/integration/'; then \
		echo 'make tiers: -m "not integration" selects tests of tests/integration' >&2; exit 1; fi; \
	if [ -z "$$slow" ] || printf "%s\n" "$$slow" | grep -qv '^tests/integration/'; then \
		echo 'make tiers: -m integration selects nothing, or tests outside tests/integration' >&2; exit 1; fi; \
	echo "tiers: $$(printf "%s\n" "$$fast" | wc -l) not integration, $$(printf "%s\n" "$$slow" | wc -l) integration"

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
