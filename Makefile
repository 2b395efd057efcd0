# MOAT — the commands README.md and .ci/run call.
#
#   sudo make demo    set up (first time) and run the demo experiment
#   sudo make test    set up (first time) and run the whole test suite
#
# Both need root, not sudo: as root (a container, CI) type `make demo` / `make test`. Nothing
# here calls sudo itself.
#
# setup is idempotent (scripts/bootstrap.sh only checks on a second run), so demo and test
# can always depend on it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY   := $(VENV)/bin/python

# Refuse to go on unless root. Names the goal(s) the user typed, so `make demo` as a normal
# user says "sudo make demo", not "sudo make setup", and says how without sudo (a root shell
# in a container has no sudo).
define require_root
	@if [ "$$(id -u)" -ne 0 ]; then \
	  echo "run as root (sudo make $(or $(MAKECMDGOALS),$@), or as root: make $(or $(MAKECMDGOALS),$@))" >&2; exit 1; \
	fi
endef

.PHONY: help setup demo test clean bench

help:
	@echo "MOAT make targets (sudo, or as root without it: make demo):"
	@echo "  sudo make setup   install system packages and build $(VENV) (idempotent)"
	@echo "  sudo make demo    setup, then run the demo experiment"
	@echo "  sudo make test    setup, then run the whole test suite (pytest tests)"
	@echo "  make clean        remove what MOAT made (moat clean) and .pytest_cache"
	@echo "  make bench        run the packet codec benchmark (needs setup done)"

setup:
	$(require_root)
	bash scripts/bootstrap.sh

demo: setup
	$(require_root)
	$(PY) -m experiments.handoff

test: setup
	$(require_root)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=25 tests

clean:
	rm -rf .pytest_cache
	@if [ -x $(VENV)/bin/moat ]; then \
	  echo "$(VENV)/bin/moat clean"; $(VENV)/bin/moat clean; \
	fi

bench:
	@if [ ! -x $(PY) ]; then \
	  echo "$(PY) not found: run sudo make setup (as root: make setup) first" >&2; exit 1; \
	fi
	$(PY) -m experiments.bench_packets
