# cvpipe: the two commands of the README's quickstart, and their set-up.
#   make run   install from Pipfile.lock, then `dvc repro` on the built-in sample data
#   make test  install from Pipfile.lock, then the test suite
#   make lock  re-resolve Pipfile.lock after editing Pipfile, then `make requirements`
#   make requirements  export each stage image's pins to docker/requirements/<image>.txt
# Everything installs into ./.venv (pipenv itself lives in ./.tools).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
TOOLS := .tools
PIPENV_VERSION := 2026.10.3
CATEGORIES ?= packages ingest preprocess train evaluate app pipeline dev
PYTEST_ARGS ?=

export PIPENV_VENV_IN_PROJECT := 1
export PIPENV_VERBOSITY := -1
export PIPENV_NOSPIN := 1
export PIPENV_YES := 1
# the package index comes from the user's own pip setup: no host is written in the project
export PYPI_URL ?= $(shell PYTHON=$(PYTHON) sh scripts/index_url.sh)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# the stage images; each installs the pipenv categories of its Dockerfile's lock-requirements line
IMAGES := ingest preprocess train evaluate app

.PHONY: install run test lock requirements clean-outputs

$(TOOLS)/bin/pipenv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q "pipenv==$(PIPENV_VERSION)"

$(VENV)/.installed: Pipfile.lock pyproject.toml | $(TOOLS)/bin/pipenv
	[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	$(TOOLS)/bin/pipenv sync --categories "$(CATEGORIES)"
	$(VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

run: install
	dvc repro

test: install
	python -m pytest $(PYTEST_ARGS)

# re-resolve Pipfile.lock after editing Pipfile
lock: | $(TOOLS)/bin/pipenv
	$(TOOLS)/bin/pipenv lock
	$(MAKE) requirements

# What each stage image installs, exactly as docker/lock-requirements.sh exports it in the image
# build (its all.txt): dvc.yaml's stages depend on these files, not on the whole Pipfile.lock.
# The categories come from the image's Dockerfile; the `-i` line is dropped (no index in files).
requirements: | $(TOOLS)/bin/pipenv
	@mkdir -p docker/requirements
	set -o pipefail; for image in $(IMAGES); do \
	  cats=$$(sed -n 's/.*lock-requirements "\([^"]*\)".*/\1/p' $$image/Dockerfile); \
	  [ -n "$$cats" ] || { echo "$$image/Dockerfile: no lock-requirements line" >&2; exit 1; }; \
	  PYPI_URL=unused $(TOOLS)/bin/pipenv requirements --hash --categories "$$cats" \
	    | grep -v '^-i ' > docker/requirements/$$image.txt.tmp || exit 1; \
	  mv docker/requirements/$$image.txt.tmp docker/requirements/$$image.txt; \
	done
