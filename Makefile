# The two entry points of the README: `make demo` (main job) and `make test` (test suite);
# `make docs` builds the documentation site, `make notebooks` re-executes the notebooks in place.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: demo test lint docs notebooks

# $(VENV)/.installed-<extra>: the package installed (editable) with that optional extra.
$(VENV)/.installed-%: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m numpyro_nnef demo

test: $(STAMP)
	$(VENV)/bin/python -m ruff check numpyro_nnef tests benchmarks
	$(VENV)/bin/python -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/python -m ruff check .

# HTML into docs/_build/html; any warning (a broken reference, a public name without a reference
# entry) fails the build. Notebooks are rendered from their stored outputs, not executed.
docs: $(DOCS_STAMP)
	$(VENV)/bin/python -m sphinx -b html -W --keep-going -q docs docs/_build/html

notebooks: $(DOCS_STAMP)
	$(VENV)/bin/python docs/execute_notebooks.py
