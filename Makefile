# arcfold: `make run` runs the default experiment, `make test` runs the test suite; each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build is an install-time choice: CPU torch 2.13.0 here. On a GPU box install your CUDA torch
# into the venv first and run `make install TORCH_CONSTRAINTS=`.
TORCH_CONSTRAINTS ?= -c constraints/cpu.txt
STAMP := $(VENV)/.installed

.PHONY: install run test sweep ui clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m arcfold

test: install
	$(PY) -m pytest -q

sweep: install
	$(PY) -m arcfold -m folds=1,2 lora.rank=4,8 data.limit=2 train.epochs=1

# One GPU check (<= 8 min on one card): GPU-marked tests, then throughput and memory of real model shapes.
# Needs a CUDA torch and the gpu extra: make install TORCH_CONSTRAINTS= && .venv/bin/pip install -e '.[gpu]'
gpu-check: install
	$(PY) benchmarks/gpu_check.py

ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --workers 1 --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db

clean:
	rm -rf outputs multirun .pytest_cache
