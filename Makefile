# The two commands that open the README:
#   make demo   create .venv, install everything, run `apa align` on the built-in MNIST default
#   make test   create .venv, install everything (and the system packages the tests use), run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# every pip call carries this constraint: a plain `torch` requirement would pull a CUDA build
TORCH := torch==2.13.0
# what `make demo` and `apa serve` need; the tests add the SD/CLIP/ImageNet extras, psycopg and Ray
EXTRAS := web
TEST_EXTRAS := test,test-extra,web,cluster

.PHONY: setup test-setup demo test system-deps

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[$(TEST_EXTRAS)]" "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

test-setup: $(VENV)/.test-installed

system-deps:
	bash scripts/install-test-deps.sh

demo: setup
	$(VENV)/bin/apa align --prior mnist --feedback oracle --prefer 1,4,7,9 --budget 80 --per-round 8 \
		--particles 32 --steps 25 --seed 0 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: test-setup
	bash scripts/install-test-deps.sh
	$(PY) -m pytest -q
