# The two entry points of the README: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m numpyro_nnef demo

test: $(STAMP)
	$(VENV)/bin/python -m ruff check numpyro_nnef tests benchmarks
	$(VENV)/bin/python -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check .
