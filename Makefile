# One command to run the service, one to test it. Setup is idempotent:
# the LibTorch venv and the cargo build are cached between runs.

VENV ?= .venv
TORCH_VERSION := 2.11.0
TORCHVISION_VERSION := 0.26.0
SETUP_STAMP := $(VENV)/.pretext-setup-$(TORCH_VERSION)-3
SCHEMATHESIS_VERSION := 4.32.5

export LIBTORCH_USE_PYTORCH := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/pretext
# Queries are checked at build time against .sqlx/, not against a live database.
export SQLX_OFFLINE := true
SQLX_CLI_VERSION := 0.8.6

.PHONY: setup build run test lint check-postgres check-sqlx sqlx-prepare sqlx-setup browser-setup bench-train bench-setup bench-labels fuzz

$(SETUP_STAMP):
	@command -v python3 >/dev/null || { echo "python3 is needed to install LibTorch (apt-get install python3 python3-venv)"; exit 1; }
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION) safetensors 'moto[server]' \
		schemathesis==$(SCHEMATHESIS_VERSION)
	touch $@

## setup: install LibTorch (torch $(TORCH_VERSION) from PyPI), moto and Schemathesis into $(VENV)
setup: $(SETUP_STAMP)

## bench-setup: the serving benchmark's reference server (FastAPI + uvicorn) and the label-efficiency plot (matplotlib) in $(VENV)
bench-setup: setup
	$(VENV)/bin/pip install --quiet --disable-pip-version-check fastapi uvicorn python-multipart matplotlib

## build: compile the release binary
build: setup
	cargo build --release --locked

## check-postgres: say clearly when no Postgres answers
check-postgres:
	@scripts/check_postgres.sh "$(DATABASE_URL)"

## run: set everything up and serve on http://127.0.0.1:8080
run: build check-postgres
	./target/release/pretext serve

## bench-train: training throughput of the release server against a PyTorch script (CPU)
bench-train: build check-postgres
	python3 bench/train_throughput/run.py

PRETEXT_URL ?= http://127.0.0.1:8080
BENCH_LABELS_ARGS ?=

## bench-labels: label efficiency of the pretext tasks on Fashion-MNIST against a running server (PRETEXT_URL, default http://127.0.0.1:8080; API key from PRETEXT_API_KEY), results in bench/results/label_efficiency_cpu.*; BENCH_LABELS_ARGS adds options
bench-labels: setup
	$(VENV)/bin/python bench/label_efficiency/run.py --name label_efficiency_cpu \
		--url "$(PRETEXT_URL)" $(BENCH_LABELS_ARGS)

## lint: formatting, clippy, no import cycle among src/ modules, and a build from exactly what docker/Dockerfile copies
lint: setup
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	python3 scripts/check_module_cycles.py
	scripts/check_docker_context.sh

## sqlx-setup: sqlx-cli $(SQLX_CLI_VERSION), which checks the SQL against a migrated Postgres
sqlx-setup:
	@command -v sqlx >/dev/null && sqlx --version | grep -q " $(SQLX_CLI_VERSION)$$" || \
		cargo install sqlx-cli --version $(SQLX_CLI_VERSION) --no-default-features --features postgres --locked

## check-sqlx: the query data in .sqlx/ matches the queries and the migrations
check-sqlx: setup sqlx-setup check-postgres
	scripts/sqlx_prepare.sh --check

## sqlx-prepare: rewrite .sqlx/ after changing a query or adding a migration (then commit it)
sqlx-prepare: setup sqlx-setup check-postgres
	scripts/sqlx_prepare.sh

BROWSER_TEST_DIR := tests/browser
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(BROWSER_TEST_DIR)/node_modules/.installed: $(BROWSER_TEST_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js 20+ with npm is needed for the dashboard's browser test"; exit 1; }
	cd $(BROWSER_TEST_DIR) && npm ci --no-audit --no-fund
	touch $@

## browser-setup: Debian's Chromium and playwright-core, for the dashboard's browser test
browser-setup: $(BROWSER_TEST_DIR)/node_modules/.installed
	@test -x $(CHROMIUM) || { \
		echo "Installing Debian's chromium for the dashboard's browser test"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

FUZZ_SECS ?= 600
FUZZ_SEED ?= 1

## fuzz: the parser fuzzers of tests/fuzz for FUZZ_SECS seconds each (default 600; make test runs them for 30 s), seed FUZZ_SEED
fuzz: setup
	PRETEXT_FUZZ_SECS=$(FUZZ_SECS) PRETEXT_FUZZ_SEED=$(FUZZ_SEED) cargo test --locked --test fuzz -- --nocapture --test-threads=2

## test: set everything up, lint, and run the whole test suite (the browser test included)
test: setup check-postgres lint check-sqlx browser-setup
	PRETEXT_BROWSER_TESTS=1 cargo test --locked -- --test-threads=2
