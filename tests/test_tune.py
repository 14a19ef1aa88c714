"""tune: the search space is checked against the real params before any trial trains; study names
follow the data and the fixed params; a study in SQLite resumes, and trials a killed process left
running are failed, not waited for. (The whole `python -m stages.tune` → `dvc exp run` path is in
test_workflow.py.)"""

from __future__ import annotations

import optuna
import pytest

from mmpipe import params, tune
from mmpipe.errors import PipelineError


def sections(**train):
    return {"train": params.TrainParams(**train), "model": params.ModelParams()}


def tune_params(headline: str = "accuracy", **overrides):
    """tune params as the tune stage holds them: ``metric: headline`` made the target's (val_accuracy)."""
    return tune.resolve_metric(params.validate("tune", overrides), headline)


def test_the_headline_metric_is_the_targets_and_a_class_metric_is_refused_for_a_number():
    assert params.validate("tune", {}).metric == "headline"
    assert tune_params().metric == "val_accuracy" and tune_params("r2").metric == "val_r2"
    assert tune_params("f1_micro", metric="val_loss").metric == "val_loss"
    assert tune.DIRECTION[tune_params("r2").metric] == "maximize"
    with pytest.raises(PipelineError, match="tune.metric: val_accuracy is not a validation figure of this target"):
        tune_params("r2", metric="val_accuracy")


@pytest.mark.parametrize("space, expected", [
    ({"data.n_samples": {"low": 10, "high": 20}},
     "params.yaml: tune.space.data.n_samples: 10 cannot be searched: data.n_samples: only train.* and model.* params"),
    ({"train.lrate": {"low": 0.001, "high": 0.01}},
     "params.yaml: tune.space.train.lrate: 0.001 cannot be searched: train.lrate: no such param in params.yaml"),
    ({"train.lr": {"low": -1.0, "high": 0.01}},
     "params.yaml: tune.space.train.lr: -1.0 cannot be searched: train.lr: Input should be greater than 0"),
    ({"model.fusion": {"choices": ["concat", "late"]}},
     "params.yaml: tune.space.model.fusion: 'late' cannot be searched: model.fusion: Input should be 'concat', 'gated' or 'attention'"),
    ({"model.encoders.image.width": {"low": 4, "high": 100000}},
     "params.yaml: tune.space.model.encoders.image.width: 100000 cannot be searched: model.encoders.image.width:"),
])
def test_a_space_value_its_param_does_not_accept_is_one_line_naming_it(space, expected):
    with pytest.raises(PipelineError) as info:
        tune.check(tune_params(space=space), sections())
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_malformed_dimensions_and_enqueued_trials_are_refused():
    for bad, why in (({"low": 0.1}, "needs low < high or choices"), ({"low": 0.0, "high": 1.0, "log": True}, "log needs low > 0"),
                     ({"choices": ["a"], "low": 1, "high": 2}, "either choices or low/high")):
        with pytest.raises(PipelineError, match=why):
            tune_params(space={"train.lr": bad})
    with pytest.raises(PipelineError, match=r"tune.enqueue\[0\]: train.seed not in tune.space"):
        tune.check(tune_params(space={"train.lr": {"low": 0.001, "high": 0.01}}, enqueue=[{"train.seed": 3}]), sections())
    with pytest.raises(PipelineError, match=r"tune.enqueue\[0\]: model.dropout: Input should be less than 1"):
        tune.check(tune_params(space={"model.dropout": {"low": 0.0, "high": 0.5}}, enqueue=[{"model.dropout": 1.5}]), sections())


def test_study_name_follows_data_and_fixed_params_not_searched_values_or_device():
    cfg = tune_params(space={"train.lr": {"low": 0.001, "high": 0.01}})
    name = tune.study_name(cfg, sections(), "digest-a")
    assert name.startswith("mmpipe-") and name == tune.study_name(cfg, sections(), "digest-a")
    assert tune.study_name(cfg, sections(lr=0.005, device="cpu", threads=2), "digest-a") == name  # searched / where it runs
    assert tune.study_name(cfg, sections(), "digest-b") != name  # other data
    assert tune.study_name(cfg, sections(epochs=5), "digest-a") != name  # other fixed params
    assert tune.study_name(tune_params(space=cfg.space, study="mine"), sections(), "digest-a") == "mine"


def test_suggested_values_have_their_params_types_and_make_valid_params(tmp_path):
    cfg = tune_params(space={"model.encoders.image.width": {"low": 8, "high": 32, "step": 8},
                             "train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                             "model.augment": {"choices": [True, False]}})
    study = tune.open_study(cfg, "types", tmp_path / "tune.db", max_epochs=5)
    trial = study.ask()
    values = tune.suggest(trial, cfg.space)
    assert isinstance(values["model.encoders.image.width"], int) and values["model.encoders.image.width"] in (8, 16, 24, 32)
    assert 1e-4 <= values["train.lr"] <= 1e-2 and isinstance(values["model.augment"], bool)
    chosen = tune.with_values(sections(), values)
    assert chosen["model"].encoders.image.width == values["model.encoders.image.width"]
    assert tune.dvc_exp_command("tuned-x-t0", {"train.lr": 0.002, "model.fusion": "gated", "model.augment": False}) == [
        "exp", "run", "-n", "tuned-x-t0", "-S", "train.lr=0.002", "-S", 'model.fusion="gated"', "-S", "model.augment=false"]


def test_study_resumes_from_sqlite_and_fails_trials_a_killed_process_left_running(tmp_path, capsys):
    cfg = tune_params(space={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, enqueue=[{"train.lr": 0.003}])
    study = tune.open_study(cfg, "resume", tmp_path / "tune.db", max_epochs=5)
    study.optimize(lambda trial: trial.suggest_float("train.lr", 1e-4, 1e-2, log=True), n_trials=2)
    orphan = study.ask()  # a trial whose process died: RUNNING, held by a pid that no longer exists
    orphan.set_user_attr("mmpipe.pid", "999999999")
    orphan.set_user_attr("mmpipe.process_start", "0")
    again = tune.open_study(cfg, "resume", tmp_path / "tune.db", max_epochs=5)
    states = [t.state for t in again.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]
    assert again.trials[0].params == {"train.lr": 0.003}  # the enqueued trial ran first, and only once
    assert len(tune.finished(again)) == 3 and len(tune.counted(again)) == 2  # the killed one does not count
    assert "trial 2 was left running by a process that was killed: marked FAIL" in capsys.readouterr().out


def test_any_error_in_a_trial_fails_that_trial_and_the_study_goes_on(tmp_path, monkeypatch):
    from mmpipe import tracking

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tune_params(space={"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}, pruner={"kind": "none"})
    study = tune.open_study(cfg, "errors", tmp_path / "tune.db", max_epochs=3)
    outcomes = iter([RuntimeError("CUDA out of memory"), ValueError("heads must divide dim"), None])
    lines = []

    def train_once(train_cfg, model_cfg, on_epoch):
        error = next(outcomes)
        if error is not None:
            raise error
        on_epoch(0, {"epoch": 0, "val_accuracy": 0.5})
        return {"history": [{"val_accuracy": 0.5}], "metrics": {"seconds": 0.1}}

    with tracking.tune_run("errors", cfg):
        study.optimize(tune.objective(cfg, sections(), train_once, "errors", lines.append), n_trials=3, catch=(Exception,))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2 + [optuna.trial.TrialState.COMPLETE]
    assert lines[:2] == ["tune: trial 0 failed: RuntimeError: CUDA out of memory",
                         "tune: trial 1 failed: ValueError: heads must divide dim"]
