# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv from the pinned constraints when it is missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mergescope demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf runs build *.egg-info
