# sop_lightning — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_CONFIG ?= experiments/demo/sop.yaml

.PHONY: demo test install install-dev data lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The demo data: Debian's dataset-fashion-mnist (60k/10k 28x28 images, offline).
data:
	@if [ ! -f $(FMNIST) ]; then \
		echo "Installing the demo data (Debian package dataset-fashion-mnist)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(PY) scripts/demo.py --config $(DEMO_CONFIG)

test: install-dev data
	$(PY) -m pytest -q --durations=15  # the slowest tests, to keep the suite short

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

format: install-dev
	$(VENV)/bin/ruff format src tests benchmarks scripts
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts

clean:
	rm -rf runs lightning_logs .pytest_cache
