# One-command set-up: `make test` and `make demo` create .venv and install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines get the pinned CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
PYTEST_ARGS ?=
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server pdsh

.PHONY: install system-deps test demo clean

install: system-deps $(STAMP)

# The virtual-cluster tests (tests/cluster) need sshd and pdsh. Installed only as root and only when
# missing; an apt failure leaves the build working and those tests skip, saying what is missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && ! { [ -x /usr/sbin/sshd ] && command -v pdsh >/dev/null 2>&1; }; then \
	  echo "installing openssh-server and pdsh for the virtual-cluster tests"; \
	  { $(APT_INSTALL) || { apt-get update -qq && $(APT_INSTALL); }; } \
	    || echo "apt-get failed: the virtual-cluster tests will skip, naming what is missing"; \
	fi

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-build-isolation deepspeed
	$(BIN)/pip install --quiet -e ".[test,mpi,tools]"
	$(BIN)/python -m megallama.train.warmup_ops || true
	touch $(STAMP)

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS) tests

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash examples/demo.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
