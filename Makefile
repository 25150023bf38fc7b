# Two commands on a fresh machine (see README.md):
#   make demo   install, then run the whole tiny pipeline (data -> train -> eval -> error study -> report)
#   make test   install (Python packages and the Debian SLURM packages), then ruff and the whole test suite
VENV ?= .venv
BIN := $(VENV)/bin
# img2dataset in an environment of its own (see requirements-img2dataset.txt); `neuclip data download` runs it.
I2D_VENV ?= .venv-img2dataset
CORES ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install img2dataset debs demo test check lint gpu-check clean-tiny

install: $(VENV)/.installed $(I2D_VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

img2dataset: $(I2D_VENV)/.installed

$(I2D_VENV)/.installed: requirements-img2dataset.txt
	test -x $(I2D_VENV)/bin/python || python3 -m venv $(I2D_VENV)
	$(I2D_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-img2dataset.txt
	touch $@

debs:
	bash .ci/install_debs.sh

demo: install
	$(BIN)/snakemake -c$(CORES) all
	@echo "Tables and plots: results/tiny/ (start with results/tiny/index.md)"

lint: install
	$(BIN)/ruff check .

test: install debs lint
	$(BIN)/pytest

# The inner loop: ruff and the in-process tests (no process, pipeline or cluster is started: those carry the
# `slow` or `slurm` marker and run in `make test`). About a minute on 2 cores.
check: install lint
	$(BIN)/pytest -q -m "not slow and not slurm and not gpu"

# On a machine with a CUDA GPU: the CUDA-path tests (bf16, single GPU without NCCL, GPU vs CPU) and the
# estimator step costs at paper shapes on the GPU. Not part of `make test` (no GPU there).
gpu-check: install
	$(BIN)/pytest -m gpu -rs tests/test_gpu.py
	$(BIN)/neuclip bench estimators --device cuda

clean-tiny:
	rm -rf runs/tiny results/tiny data/synthetic/tiny .snakemake
