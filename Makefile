# The two commands that open the README:
#   make demo   create .venv, install everything, run `apa align` on the built-in MNIST default
#   make test   create .venv, install everything, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: setup demo test system-deps

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]" "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/apa align --prior mnist --feedback oracle --prefer 1,4,7,9 --out runs/demo

test: setup
	$(PY) -m pytest -q
