# One command each, on a fresh clone: `make demo` runs the stack with demo data,
# `make test` runs the test suite. Both install into .venv first when needed.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: test demo install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	$(VENV)/bin/topology up --demo

clean:
	rm -rf $(VENV) .topology .pytest_cache
