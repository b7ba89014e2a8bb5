# Quick start (fresh machine):  make demo   |   make test
VENV ?= .venv
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo lint format test dry-run-paper clean-results

setup: $(VENV)/.installed

# torch first, pinned: every later resolve is constrained to it (an unpinned torch or torchvision
# would pull a multi-GB CUDA build on a CPU machine; on a GPU machine this pin is the CUDA build).
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $@

# The demo has no real GPU work: let two single-threaded jobs share the (possibly absent) GPU.
demo: setup
	$(VENV)/bin/snakemake --profile profiles/local --resources gpu=2
	$(VENV)/bin/snakemake --report results/report.html

# Style is mechanical: ruff (lint + format) for Python, snakefmt for the Snakefile and rules.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/snakefmt Snakefile workflow/rules

test: lint
	$(VENV)/bin/pytest -q

dry-run-paper: setup
	$(VENV)/bin/snakemake -n --profile profiles/local --configfile config/config.yaml

clean-results:
	rm -rf results logs resources .snakemake
