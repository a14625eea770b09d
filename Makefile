# cvpipe: the two commands of the README's quickstart, and their set-up.
#   make run   install from Pipfile.lock, then `dvc repro` on the built-in sample data
#   make test  install from Pipfile.lock, then the test suite
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

.PHONY: install run test lock clean-outputs

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
