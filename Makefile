# Quick start: `make serve` installs k5serve with what the server needs and starts it; `make test` adds the test
# tools and the optional extras the suite uses, and runs the whole suite. Both create .venv on first use.
#
# Python: the newest of $(PYTHONS) that runs here (a pyenv shim for a version pyenv has not selected is on PATH
# but does not run, so it is skipped). `make serve PYTHON=python3.12` names one. An existing .venv keeps the
# Python it was made with until `make clean`.
PYTHONS := python3.13 python3.12 python3.11
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,$(PYTHONS),$(shell $(p) -c '' >/dev/null 2>&1 && echo $(p))))
endif
VENV := .venv
PIP := $(VENV)/bin/pip
# setuptools prints an "Editable installation" notice (not a warning about this project) for every editable
# install through its import hook; it is left out of `make`'s output.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation." $(PIP) install
CORE := $(VENV)/.installed-core
TEST := $(VENV)/.installed-test
HOST ?= 127.0.0.1
PORT ?= 8080

# TORCH_INDEX=cpu takes PyTorch's CPU-only build of the pinned torch and torchvision from PyTorch's own index
# (a few hundred MB instead of PyPI's CUDA build of several GB), for a machine without an NVIDIA GPU:
#   make serve TORCH_INDEX=cpu
# Any other value is used as the index URL (e.g. https://download.pytorch.org/whl/cu128). It applies when .venv's
# packages are installed (first run, or after pyproject.toml changes).
TORCH_INDEX ?=
ifeq ($(TORCH_INDEX),cpu)
TORCH_INDEX_URL := https://download.pytorch.org/whl/cpu
else
TORCH_INDEX_URL := $(TORCH_INDEX)
endif
TORCH_PINS := $(shell sed -n 's/^ *"\(torch\(vision\)\{0,1\}==[^"]*\)".*/\1/p' pyproject.toml)

.PHONY: install serve test bench generate clean
.DEFAULT_GOAL := install

# pip is the last thing `python -m venv` makes: a venv that failed half-way (Debian's python3.X without its
# python3.X-venv package, say) is removed, not left for later runs to trip over.
$(PIP):
	@test -n "$(PYTHON)" || { echo "k5serve needs Python 3.11, 3.12 or 3.13, and none of $(PYTHONS) runs here." \
	    "Install one, or name one: make $(MAKECMDGOALS) PYTHON=/path/to/python3.13" >&2; exit 1; }
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1) || { echo "k5serve needs" \
	    "Python 3.11, 3.12 or 3.13; PYTHON=$(PYTHON) does not run here: $$(echo "$$v" | head -n 1)" >&2; exit 1; }; \
	case $$v in 3.11|3.12|3.13) ;; *) echo "k5serve needs Python 3.11, 3.12 or 3.13; PYTHON=$(PYTHON) is" \
	    "Python $$v." >&2; exit 1;; esac
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "k5serve: $(PYTHON) -m venv failed; on Debian and" \
	    "Ubuntu install the python3.X-venv package of that Python" >&2; exit 1; }
	$(PIP) install --upgrade --quiet pip

# The package and its core dependencies: what `k5serve serve` and `k5serve generate` need, with the quantisation
# libraries of the memory profiles (bitsandbytes, torchao: about 50 MB), so that a 24, 16 or 12 GB card serves.
$(CORE): pyproject.toml | $(PIP)
	$(if $(TORCH_INDEX_URL),$(PIP_INSTALL) $(TORCH_PINS) --index-url $(TORCH_INDEX_URL))
	$(PIP_INSTALL) -e ".[quant]"
	touch $@

# The test tools and the optional extras the suite needs (Ray, PostgreSQL, S3, the text encoder's quantisation
# libraries), on top of the core install.
$(TEST): $(CORE)
	$(PIP_INSTALL) -e ".[test,ray,postgres,s3,quant]"
	touch $@

install: $(CORE)

# Real weights on a GPU when they are downloaded; otherwise generated tiny weights on the CPU (it says so).
serve: $(CORE)
	$(VENV)/bin/k5serve serve --host $(HOST) --port $(PORT) --fallback-tiny

# One image without a server: make generate PROMPT="a red fox" [ARGS="--steps 10 --seed 1"]; images and
# results.json go to out/. Without downloaded weights or a GPU add ARGS=--tiny (CPU test mode: generated tiny
# weights, noise for images). `.venv/bin/k5serve generate --help` lists the options.
override PROMPT := $(value PROMPT)
export PROMPT
generate: $(CORE)
	@test -n "$$PROMPT" || { echo 'usage: make generate PROMPT="a red fox" [ARGS=--tiny]' >&2; exit 1; }
	$(VENV)/bin/k5serve generate --prompt "$$PROMPT" $(ARGS)

test: $(TEST)
	$(VENV)/bin/python -m pytest -q

bench: $(TEST)
	$(VENV)/bin/python benchmarks/bench_http.py

clean:
	rm -rf $(VENV) .k5serve
