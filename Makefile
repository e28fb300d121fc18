# One-command set-up: `make test` and `make demo` create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines get the pinned CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PYTEST_ARGS ?=

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-build-isolation deepspeed
	$(BIN)/pip install --quiet -e ".[test,mpi,tools]"
	$(BIN)/python -m megallama.train.warmup_ops || true
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash examples/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
