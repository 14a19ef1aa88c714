# Two commands on a fresh machine: `make repro` (run the pipeline) and `make test` (run the tests).
# Both create .venv on first use and reinstall when the requirement files change.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: put the venv first on PATH for everything make runs.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install ui bench pull push ci exps tune wheelhouse

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest

# Benchmarks (not tests), the CPU figures of docs/benchmarks.md: this project's paths vs naive baselines
# (reports/bench.json), the pipeline on user-shaped files stage by stage (reports/bench_realistic/), and
# the scaling curve of every stage (reports/bench_scaling.*). About an hour on 2 cores.
bench: $(STAMP)
	python -m bench.run --samples 20000
	python -m bench.realistic --samples 10000
	python -m bench.scaling --samples 1000 4000 16000

# MLflow UI on the project's tracking store (the SQLite file the stages write to); prints the address
# that opens it on the pipeline's runs (MLflow 3 opens on its GenAI overview otherwise).
ui: $(STAMP)
	python tools/mlflow_ui.py --port 5000

# DVC remote (default: the folder ../mmpipe-dvc-remote; see README "CI and the run-cache").
# pull: the data of dvc.lock and the run-cache (missing objects are fine on a first run).
pull: $(STAMP)
	dvc pull --run-cache --allow-missing

# push: the data of dvc.lock, the run-cache, and every object the run-cache refers to.
push: $(STAMP)
	python tools/push_run_cache.py

# What CI runs: restore what it can, run only what changed, share the results, report the change.
ci: pull
	dvc repro --pull
	$(MAKE) push
	dvc metrics diff --md HEAD

# The experiments with their headline metrics (the columns of the MLflow pipeline rows).
exps: $(STAMP)
	dvc exp show --drop '.*' --keep 'Experiment|Created|State|model\.fusion|test\.accuracy|test\.f1_macro|fusion_gain|robustness\.[a-z]+\.relative|shipped\.(file_bytes|batch_32_p50_ms)'

# Hyperparameter search (Optuna, params.yaml: tune): the features first, then the study (resumes from
# tune.db), then the best values through the whole pipeline as a DVC experiment (tune.run_best).
tune: $(STAMP)
	dvc repro preprocess
	python -m stages.tune

# For a GPU machine without index access whose Python already has torch (README "On an offline GPU
# machine"): every other requirement as wheels in .whl/ (~60 MB), with .whl/run-offline.sh to run there.
wheelhouse:
	tools/offline/offline-wheelhouse.sh .whl
	grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
