# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Each sets up .venv itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# timm needs torchvision: a torch + torchvision pair that is known to install and import together
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
export MALLOC_MMAP_THRESHOLD_ ?= 10000000000
export MALLOC_TRIM_THRESHOLD_ ?= 10000000000
export NO_MKDOCS_2_WARNING ?= 1
DIST ?= dist
SITE ?= site

.PHONY: help setup test test-fast lint docs package demo demo-smoke bench study clean

help:
	@echo "make demo   - pretrain a small ViT with and without SER, print the comparison table (sets up .venv)"
	@echo "make test   - lint, docs build, package checks and the whole test suite (sets up .venv)"
	@echo "make docs   - build the documentation site into $(SITE)/ (mkdocs build --strict)"
	@echo "make bench  - run the performance benchmarks"
	@echo "make study  - the full study behind the demo (long)"

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS) -e '.[test,demo,lightning,docs]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(PY) -m ruff check $(wildcard ser_plugin tests examples benchmarks study docs)

docs: setup
	$(PY) -m mkdocs build --strict --site-dir $(SITE)

# sdist + wheel in an isolated build, then the index checks; the wheel is what tests/test_package.py installs
package: setup
	rm -rf $(DIST)
	$(PY) -m build --outdir $(DIST) .
	$(PY) -m twine check --strict $(DIST)/*
	$(PY) -m check_wheel_contents $(DIST)/*.whl

test: setup lint docs package
	SER_WHEEL=$$(ls $(DIST)/ser_plugin-*.whl) $(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" -p no:cacheprovider

demo: setup
	$(PY) examples/demo/main.py $(ARGS)

demo-smoke: setup
	$(PY) examples/demo/main.py --smoke

bench: setup
	$(PY) benchmarks/run_all.py $(ARGS)

study: setup
	$(PY) study/sensitivity.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo_out $(SITE) $(DIST) build ser_plugin.egg-info
