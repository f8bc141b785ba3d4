# ESA — the newcomer's two commands are `make demo` and `make test`; both create the
# virtual environment (.venv) themselves when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.esa-installed

.PHONY: help setup demo test schema clean-venv

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

schema: $(STAMP)  ## regenerate manifests/schema/*.json from the typed spec (esa/spec/)
	$(VPY) -m esa.spec.schema_gen manifests/schema

clean-venv:  ## remove the virtual environment
	rm -rf $(VENV)

# ---------------------------------------------------------------------------------------------
# Cluster workflow (issue #5): plans -> Slurm arrays through submitit; see docs/cluster.md.
#   make submit PHASE=2 [PLAN=manifests/phase2.toml | TINY=1] [EXECUTOR=slurm|local|debug]
#               [DRY_RUN=1] [AFTER=<jobid>[,<jobid>]] [TRUST_REMOTE_CODE=1]
#   make status [RUN=runs/<exp>]   make resubmit [RUN=...]   make analyze RUN=runs/<exp> [STRICT=1]
PHASE ?=
TINY ?=
PLAN ?= $(if $(PHASE),manifests/$(if $(filter-out 0,$(TINY)),tiny/,)phase$(PHASE).toml,)
EXECUTOR ?= slurm
DRY_RUN ?=
AFTER ?=
RUN ?=
TRUST_REMOTE_CODE ?=
STRICT ?=
IMAGE ?= esa.sif
JOBS_FLAGS = --executor $(EXECUTOR) $(if $(filter-out 0,$(DRY_RUN)),--dry-run,) $(if $(filter-out 0,$(TRUST_REMOTE_CODE)),--trust-remote-code,)

.PHONY: submit status resubmit analyze image slurm-up slurm-down test-slurm

submit: $(STAMP)  ## submit a phase's plan: make submit PHASE=2 [TINY=1|PLAN=...] [EXECUTOR=local] [DRY_RUN=1]
	@test -n "$(PLAN)" || { echo "make submit: say which phase, e.g. make submit PHASE=2 (or PLAN=file.toml)" >&2; exit 2; }
	$(VPY) -m jobs submit --plan $(PLAN) $(if $(PHASE),--phase $(PHASE),) $(JOBS_FLAGS) $(if $(AFTER),--after $(AFTER),)

status: $(STAMP)  ## one line per manifest: pending/running/done/failed + reason [RUN=runs/<exp>]
	$(VPY) -m jobs status $(RUN)

resubmit: $(STAMP)  ## submit again only the failed or missing manifests [RUN=runs/<exp>] [EXECUTOR=...]
	$(VPY) -m jobs resubmit $(RUN) $(JOBS_FLAGS)

analyze: $(STAMP)  ## aggregate finished jobs into report/ : make analyze RUN=runs/<exp> [STRICT=1: fail unless all done]
	@test -n "$(RUN)" || { echo "make analyze: say which run, e.g. make analyze RUN=runs/tiny" >&2; exit 2; }
	$(VPY) -m analysis $(RUN) $(if $(filter-out 0,$(STRICT)),--strict,)

image:  ## build the Apptainer image (IMAGE=esa.sif) from containers/esa.def (needs apptainer)
	@command -v apptainer >/dev/null || { echo "make image: apptainer is not installed here; build on a machine that has it (see docs/cluster.md)" >&2; exit 2; }
	apptainer build $(IMAGE) containers/esa.def

slurm-up:  ## start the single-node test Slurm cluster on this machine (root)
	bash slurm/slurm-up.sh

slurm-down:  ## stop the test Slurm cluster
	bash slurm/slurm-down.sh

test-slurm: $(STAMP)  ## integration tests against the real test cluster (started when sinfo does not answer)
	@timeout 20 sinfo >/dev/null 2>&1 || bash slurm/slurm-up.sh
	ESA_REQUIRE_SLURM=1 $(VPY) -m pytest -q -m slurm tests
