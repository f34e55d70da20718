# emulab: two commands matter — `make lab` and `make test`. Both start from a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := debootstrap cpio zstd busybox-static gcc libc6-dev kmod util-linux iputils-ping tshark chromium

.PHONY: lab test lint typecheck unit interop bench deps clean guest-prepare warm

$(STAMP): pyproject.toml
	@$(PY) -c 'import venv, ensurepip' 2>/dev/null || { echo ">> installing python3-venv"; apt-get update -qq && apt-get install -y -qq python3-venv; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lab]'
	@touch $@

# Host packages the QEMU interop tests need (root only; a non-root run skips interop with a reason).
deps:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo ">> apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	else echo ">> not root: skipping apt packages (QEMU interop tests will skip)"; fi

lint: $(STAMP)
	$(BIN)/ruff check emulab tests bench
	$(BIN)/ruff format --check emulab tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m 'not interop' -q

interop: $(STAMP) deps
	$(BIN)/pytest -m interop -q

test: $(STAMP) deps lint typecheck warm
	$(BIN)/pytest -q

# Compile the numba kernels into their on-disk cache once (cold: ~35 s), so that tests run the
# compiled data path from their first frame (a device never waits for it: until its kernels are
# loaded it runs them interpreted; tests/avf/test_cold_start.py starts from an empty cache).
warm: $(STAMP)
	$(BIN)/python -m emulab.avf.datapath.build

guest-prepare: $(STAMP) deps
	$(BIN)/python -m emulab.qemu prepare

bench: $(STAMP)
	$(BIN)/python bench/control_path.py

# The kernels first (a fresh machine: ~35 s, a line per kernel; then well under a second), so
# that the tour's device runs compiled from its first frame. Without them it would still serve,
# interpreted, while they compile.
lab: $(STAMP) warm
	$(BIN)/jupyter lab --ip=127.0.0.1 $$( [ "$$(id -u)" = 0 ] && echo --allow-root ) \
	  notebooks/01-tour.ipynb

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
