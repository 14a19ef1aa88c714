# Two commands on a fresh machine: `make repro` (run the pipeline) and `make test` (run the tests).
# Both create .venv on first use and reinstall when the requirement files change.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: put the venv first on PATH for everything make runs.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test install ui bench

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest

# Benchmarks (not tests): this project's paths vs naive baselines, written to reports/bench.json.
bench: $(STAMP)
	python -m bench.run --samples 20000

# MLflow UI on the project's tracking store (the SQLite file the stages write to).
ui: $(STAMP)
	mlflow ui --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" --host 127.0.0.1 --port 5000
