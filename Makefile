# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv from the pinned constraints when it is missing, with every extra
# (the demo needs the datasets and efficientnet extras) and the test tools.
# `make check` runs the static checks CI runs before the tests: the import contracts
# (import-linter), ruff (lint and format) and mypy on the core.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
MYPY_PATH := build/mypy-path
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test check lint typecheck imports clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[all,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergescope demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

check: imports lint typecheck

imports: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

lint: $(STAMP)
	$(VENV)/bin/ruff check core plugins tests bench examples
	$(VENV)/bin/ruff format --check core plugins

# mypy finds the packages under their import names through links (see [tool.mypy]).
typecheck: $(STAMP)
	mkdir -p $(MYPY_PATH)
	ln -sfn ../../core $(MYPY_PATH)/mergescope
	ln -sfn ../../plugins $(MYPY_PATH)/mergescope_plugins
	$(VENV)/bin/mypy

clean:
	rm -rf runs build *.egg-info
