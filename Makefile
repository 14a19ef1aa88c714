# Two commands on a fresh machine: `make repro` (run the pipeline) and `make test` (run the tests).
# Both create .venv on first use and reinstall when pyproject.toml or constraints.txt change: `make repro`
# the pipeline's dependencies only (`pip install -e .`), `make test` adds the [dev] extra (tests,
# benchmarks, notebooks, pretrained text models, tuning).
# TORCH=cpu (e.g. `make repro TORCH=cpu`, on the first install): the CPU builds of torch/torchvision/
# torchaudio at the pinned versions from PyTorch's CPU wheel index, ~0.2 GB instead of ~4.5 GB of CUDA
# libraries — for laptops and CPU-only CI. Needs that index to be reachable (README "Install").
PYTHON ?= python3
VENV   := .venv
TORCH  ?= default
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
TORCH_PINS = $(shell grep -E '^torch(vision|audio)?==' requirements.txt | sed 's/ .*//')
PIP = $(VENV)/bin/python -m pip install --quiet
# Stage commands in dvc.yaml call `python`: put the venv first on PATH for everything make runs.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test test-fast install install-dev ui bench pull push ci exps tune wheelhouse doctor

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
ifeq ($(TORCH),cpu)
	$(PIP) --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS)
endif
	$(PIP) -e . -c constraints.txt
	touch $(RUN_STAMP)

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e '.[dev]' -c constraints.txt
	touch $(DEV_STAMP)

repro: $(RUN_STAMP)
	dvc repro

test: $(DEV_STAMP)
	python -m pytest

# The fast subset (what CI runs on pull requests): every test not marked slow, ~2.5 minutes on 2 cores (322 of 404 tests).
test-fast: $(DEV_STAMP)
	python -m pytest -m "not slow"

# Is this machine and project ready? Versions, CUDA, disk, params.yaml, MLflow store, DVC remote.
doctor: $(RUN_STAMP)
	mmpipe doctor

# Benchmarks (not tests), the CPU figures of docs/benchmarks.md: this project's paths vs naive baselines
# (reports/bench.json), the pipeline on user-shaped files stage by stage (reports/bench_realistic/), and
# the scaling curve of every stage (reports/bench_scaling.*). About an hour on 2 cores.
bench: $(DEV_STAMP)
	python -m bench.run --samples 20000
	python -m bench.realistic --samples 10000
	python -m bench.scaling --samples 1000 4000 16000

# MLflow UI on the project's tracking store (the SQLite file the stages write to); prints the address
# that opens it on the pipeline's runs (MLflow 3 opens on its GenAI overview otherwise).
ui: $(RUN_STAMP)
	mmpipe ui --port 5000

# DVC remote (default: the folder ../mmpipe-dvc-remote; see README "CI and the run-cache").
# pull: the data of dvc.lock and the run-cache (missing objects are fine on a first run).
pull: $(RUN_STAMP)
	dvc pull --run-cache --allow-missing

# push: the data of dvc.lock, the run-cache, and every object the run-cache refers to.
push: $(RUN_STAMP)
	python tools/push_run_cache.py

# What CI runs: restore what it can, run only what changed, share the results, report the change.
ci: pull
	dvc repro --pull
	$(MAKE) push
	dvc metrics diff --md HEAD

# The experiments with their headline metrics (the columns of the MLflow pipeline rows).
exps: $(RUN_STAMP)
	dvc exp show --drop '.*' --keep 'Experiment|Created|State|model\.fusion|test\.accuracy|test\.f1_macro|fusion_gain|robustness\.[a-z]+\.relative|shipped\.(file_bytes|batch_32_p50_ms)'

# Hyperparameter search (Optuna, params.yaml: tune): the features first, then the study (resumes from
# tune.db), then the best values through the whole pipeline as a DVC experiment (tune.run_best).
tune: $(VENV)/.installed-tune
	mmpipe tune

$(VENV)/.installed-tune: $(RUN_STAMP)
	$(PIP) -e '.[tune]' -c constraints.txt
	touch $@

# For a GPU machine without index access whose Python already has torch (README "On an offline GPU
# machine"): every other requirement as wheels in .whl/ (~60 MB), with .whl/run-offline.sh to run there;
# then checks the working tree and .whl/ fit what a lent GPU machine takes (64 MiB: bench/gpu_run.sh).
wheelhouse:
	tools/offline/offline-wheelhouse.sh .whl
	python3 tools/offline/carry_size.py .whl
