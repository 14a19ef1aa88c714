"""Hyperparameter search over ``train.*`` and ``model.*`` params with Optuna.

Each trial trains the fusion model (no baselines) on the current feature sets with the searched
values in place of params.yaml's, scored on the *validation* split (``tune.metric``; the test split
is never looked at), reporting every epoch to the pruner (median or Hyperband), which may stop it
early. The study lives in SQLite beside mlflow.db (``tune.db``), so a killed or extended search
resumes where it stopped; its name follows the data and the fixed params unless ``tune.study`` names
it. Trials are MLflow child runs of one row per study (mmpipe.tracking). The best values are then
meant to go through the whole pipeline as a DVC experiment (``dvc_exp_command``), so the winner is
evaluated on the test split, compressed and exported like any other run, with full lineage.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

from mmpipe import params as params_module
from mmpipe.errors import PipelineError, redact
from mmpipe.extras import require

STUDY_FILE = "tune.db"
KILLED = "mmpipe.killed"  # user attribute of a trial a killed process left running
SEARCHABLE = ("train", "model")  # what a trial can change without new features
# the validation figures a trial may be judged by: each target's headline (maximised) and the loss
DIRECTION = {"val_accuracy": "maximize", "val_r2": "maximize", "val_f1_micro": "maximize", "val_loss": "minimize"}


def resolve_metric(cfg, headline: str):
    """``cfg`` with ``tune.metric`` as the training rows name it: ``headline`` -> ``val_<the target's
    headline>`` (val_accuracy, val_r2, val_f1_micro); val_accuracy only for a class target."""
    metric = f"val_{headline}" if cfg.metric == "headline" else cfg.metric
    if metric not in DIRECTION or (metric.startswith("val_") and metric != "val_loss" and metric != f"val_{headline}"):
        raise PipelineError(f"tune.metric: {cfg.metric} is not a validation figure of this target "
                            f"(its headline is {headline}): use headline or val_loss")
    return cfg.model_copy(update={"metric": metric})


def _set(doc: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        doc = doc[part]
    if last not in doc:
        raise KeyError(last)
    doc[last] = value


def with_values(sections: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``{"train": TrainParams, "model": ModelParams}`` with ``{"train.lr": 0.01, ...}`` applied and
    validated; PipelineError naming the key when a value is not valid there."""
    raw = {name: section.model_dump(mode="json") for name, section in sections.items()}
    for key, value in values.items():
        section = key.split(".", 1)[0]
        if section not in SEARCHABLE or "." not in key:
            raise PipelineError(f"{key}: only train.* and model.* params can be searched (a trial reuses the "
                                "current data/features)")
        try:
            _set(raw[section], key.split(".", 1)[1], value)
        except (KeyError, TypeError):
            raise PipelineError(f"{key}: no such param in params.yaml") from None
    out = {}
    for name, doc in raw.items():
        try:
            out[name] = params_module.validate(name, doc, file="")
        except PipelineError as exc:
            raise PipelineError(str(exc).splitlines()[0].removeprefix(": ")) from None
    return out


def check(cfg, sections: dict[str, Any]) -> None:
    """Every bound and choice of ``tune.space`` and every ``tune.enqueue`` trial is a valid value of
    its param (one line naming the key otherwise), before any trial trains."""
    for key, dim in cfg.space.items():
        for value in dim.choices if dim.choices is not None else [dim.low, dim.high]:
            value = int(value) if dim.is_int else value
            try:
                with_values(sections, {key: value})
            except PipelineError as exc:
                raise PipelineError(f"params.yaml: tune.space.{key}: {value!r} cannot be searched: {exc}") from None
    for i, trial in enumerate(cfg.enqueue):
        unknown = sorted(set(trial) - set(cfg.space))
        if unknown:
            raise PipelineError(f"params.yaml: tune.enqueue[{i}]: {', '.join(unknown)} not in tune.space")
        try:
            with_values(sections, trial)
        except PipelineError as exc:
            raise PipelineError(f"params.yaml: tune.enqueue[{i}]: {exc}") from None


def study_name(cfg, sections: dict[str, Any], data_digest: str) -> str:
    """``tune.study``, else one name per (data, fixed params, space, metric): changing any of them
    starts a new study instead of mixing trials that are not comparable."""
    if cfg.study:
        return cfg.study
    fixed = {name: section.model_dump(mode="json") for name, section in sections.items()}
    for key in cfg.space:
        section, rest = key.split(".", 1)
        _set(fixed[section], rest, None)
    fixed["train"]["device"] = fixed["train"]["threads"] = None  # where it runs does not change the results
    basis = json.dumps({"data": data_digest, "fixed": fixed, "space": {k: v.model_dump() for k, v in cfg.space.items()},
                        "metric": cfg.metric}, sort_keys=True)
    return "mmpipe-" + hashlib.sha1(basis.encode()).hexdigest()[:10]


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for key, dim in space.items():
        if dim.choices is not None:
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif dim.is_int:
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def open_study(cfg, name: str, storage_path: Path, max_epochs: int):
    """The study ``name`` in SQLite at ``storage_path`` (created or resumed), with its sampler and
    pruner; trials a killed process left RUNNING are marked FAIL (they will not report again)."""
    optuna = require("optuna", "tune (the hyperparameter search)")

    from mmpipe.tracking import holder_alive

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed by the caller
    if cfg.pruner.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.startup_trials,
                                             n_warmup_steps=cfg.pruner.warmup_epochs)
    elif cfg.pruner.kind == "hyperband":
        pruner = optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner.warmup_epochs), max_resource=max_epochs)
    else:
        pruner = optuna.pruners.NopPruner()
    storage_path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{storage_path}")
    study = optuna.create_study(study_name=name, storage=storage, direction=DIRECTION[cfg.metric],
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed), pruner=pruner, load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not holder_alive(trial.user_attrs):
            storage.set_trial_user_attr(trial._trial_id, KILLED, True)  # (only a running trial takes attributes)
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            print(f"tune: trial {trial.number} was left running by a process that was killed: marked FAIL "
                  "(not counted in tune.trials)")
    for values in cfg.enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    return study


def finished(study) -> list:
    return [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]


def counted(study) -> list:
    """The finished trials that count against ``tune.trials``: not those a killed process left behind
    (their search did not run to an answer; the study runs another in their place)."""
    return [t for t in finished(study) if not t.user_attrs.get(KILLED)]


def objective(cfg, sections: dict[str, Any], train_once: Callable[[Any, Any, Callable], dict], study_label: str,
              log: Callable[[str], None] = print) -> Callable:
    """The Optuna objective: one trial = one training run with the suggested values; each epoch is
    an MLflow step of the trial's child run and a report to the pruner."""
    optuna = require("optuna", "tune (the hyperparameter search)")

    from mmpipe import tracking

    def run(trial) -> float:
        values = suggest(trial, cfg.space)
        for key, value in tracking.process_tags().items():  # so that a resumed study can tell a dead trial
            trial.set_user_attr(key, value)
        stopped: Exception | None = None  # raised after the MLflow run is closed, so its status is ours
        with tracking.trial_run(study_label, trial.number, values) as mlrun:
            pruned_at = None
            try:
                chosen = with_values(sections, values)

                def on_epoch(epoch: int, row: dict) -> None:
                    nonlocal pruned_at
                    mlrun.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                    trial.report(row[cfg.metric], epoch)
                    if trial.should_prune():
                        pruned_at = epoch
                        raise optuna.TrialPruned(f"{cfg.metric} {row[cfg.metric]:.4f} at epoch {epoch}")

                result = train_once(chosen["train"], chosen["model"], on_epoch)
                history = [row[cfg.metric] for row in result["history"]]
                value = max(history) if DIRECTION[cfg.metric] == "maximize" else min(history)
                if math.isnan(value):
                    raise PipelineError(f"{cfg.metric} is NaN (the run diverged)")
            except optuna.TrialPruned as exc:
                mlrun.set_tags({"optuna.state": "PRUNED", "tune.pruned_at_epoch": str(pruned_at)})
                log(f"tune: trial {trial.number} pruned ({exc}); {_shown(values)}")
                stopped = exc
            except Exception as exc:  # any error of one trial's values (a diverged run, an OOM, a shape error) fails that trial
                reason = str(exc).splitlines()[0] if str(exc) else ""
                reason = reason if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {reason}".rstrip(": ")
                mlrun.set_tags({"optuna.state": "FAIL", "tune.error": redact(reason)[:500]})
                log(f"tune: trial {trial.number} failed: {redact(reason)}")
                stopped = exc
            else:
                mlrun.log_metrics({cfg.metric: value, "epochs_run": len(history), "seconds": result["metrics"]["seconds"]})
                mlrun.set_tags({"optuna.state": "COMPLETE"})
                log(f"tune: trial {trial.number} {cfg.metric} {value:.4f} ({len(history)} epochs); {_shown(values)}")
        if stopped is not None and not isinstance(stopped, optuna.TrialPruned):
            tracking.mark_failed(mlrun.run_id)
        if stopped is not None:
            raise stopped
        return value

    return run


def _shown(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def summary(study) -> dict[str, Any]:
    """Counts by state, the best trial, and parameter importances (when Optuna can compute them)."""
    optuna = require("optuna", "tune (the hyperparameter search)")

    trials = finished(study)
    states = {state.name.lower(): sum(t.state == state for t in trials) for state in
              (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
    out: dict[str, Any] = {"study": study.study_name, "trials": len(trials), **states}
    if states["complete"]:
        best = study.best_trial
        out["best"] = {"trial": best.number, "value": best.value, "params": best.params}
    if states["complete"] >= 2:
        try:
            with warnings.catch_warnings():  # "too few trials: importances will be equal"
                warnings.simplefilter("ignore")
                out["importance"] = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError):  # e.g. every completed trial had the same values
            pass
    return out


def write_plots(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importance plots (PNG) and the trials table (CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    written.append(folder / "trials.csv")
    for name, plot in (("history", optuna_plots.plot_optimization_history),
                       ("importance", optuna_plots.plot_param_importances),
                       ("intermediate", optuna_plots.plot_intermediate_values)):
        try:
            with warnings.catch_warnings():  # "experimental" plots; equal importances with few trials
                warnings.simplefilter("ignore")
                axes = plot(study)
        except (RuntimeError, ValueError):  # too few completed trials for this plot
            continue
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / f"{name}.png")
    return written


def experiment_name(study_name: str, trial_number: int) -> str:
    return f"tuned-{study_name}-t{trial_number}"


def dvc_exp_command(name: str, best_params: dict[str, Any]) -> list[str]:
    """``dvc exp run -n <name> -S key=value ...``: the whole pipeline with the best values."""
    command = ["exp", "run", "-n", name]
    for key, value in best_params.items():
        command += ["-S", f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else repr(value)}"]
    return command
