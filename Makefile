# Quick start: `make serve` or `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: install serve test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -e ".[test,ray,postgres,s3]"
	touch $(STAMP)

install: $(STAMP)

# Real weights on a GPU when they are downloaded; otherwise generated tiny weights on the CPU (it says so).
serve: $(STAMP)
	$(VENV)/bin/k5serve serve --host $(HOST) --port $(PORT) --fallback-tiny

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_http.py

clean:
	rm -rf $(VENV) .k5serve
