# The two set-up commands of the README: `make demo` and `make test`. Both create .venv if missing.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install demo test bench

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU wheel, never an unpinned CUDA build.
	$(VENV)/bin/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Runs the whole DAG on the embedded Tux Paint data, then records its outputs in dvc.lock so that
# `dvc repro` and `snakemake` both find nothing to do afterwards.
demo: install dvc.yaml
	@bash scripts/apt-lists.sh
	snakemake --cores all
	dvc commit --force --quiet
	@echo "Done: metrics in data/tuxpaint/eval/, runs in runs/ (Sacred), reports in reports/."

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 pytest -q

bench: install
	python bench/bench_decoding.py

# dvc.yaml is rendered from params/ (one stage per step, scheme and method recipe).
dvc.yaml: params/methods.yaml params/train.yaml params/features.yaml workflow/dvc_stages.py
	python workflow/dvc_stages.py
