# ESA — the newcomer's two commands are `make demo` and `make test`; both create the
# virtual environment (.venv) themselves when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.esa-installed

.PHONY: help setup demo test clean-venv

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the pinned dependencies + esa (editable)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml containers/install.sh
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	containers/install.sh $(VPY) --test --editable
	@touch $@

demo: $(STAMP)  ## the main job, offline, on the built-in tiny model; ends by printing the report's path
	$(VPY) -m esa demo

test: $(STAMP)  ## the unit and end-to-end tests (no cluster, no network)
	$(VPY) -m pytest -q -m "not slurm" tests

clean-venv:  ## remove the virtual environment
	rm -rf $(VENV)
