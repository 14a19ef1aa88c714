"""MLflow tracking against a real SQLite store; fail-fast on an unreachable server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from mmpipe import params, tracking
from mmpipe.tracking import retries
from mmpipe.errors import PipelineError


def test_project_root_steps_out_of_dvc_experiment_workspaces(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (workspace / "stages").mkdir(parents=True)
    (workspace / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    assert tracking.project_root(workspace / "stages") == tmp_path
    assert tracking.project_root(tmp_path / "sub") == tmp_path


def test_default_uri_is_absolute_sqlite_in_project_root(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri() == "http://example.invalid:5000"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_in_one_line():
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        tracking.check_reachable(uri, timeout_s=2)
    assert time.monotonic() - started < 5
    assert str(info.value).startswith(f"MLflow tracking server {uri} is unreachable")
    assert "\n" not in str(info.value)


def test_stage_run_logs_tags_params_metrics_artifacts(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("clean: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_STAGE", "clean")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-123")
    metrics_file = tmp_path / "m.json"
    metrics_file.write_text(json.dumps({"kept": 7, "split": {"train": 5}, "note": "text is skipped",
                                        "per_class": {"a b/c": {"train": 1}}}))
    with tracking.stage_run("clean", params.CleanParams(), system_metrics=False) as run:
        run.log_metrics_file(metrics_file)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    stored = mlflow.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["dvc.stage"] == "clean" and stored.data.tags["dvc.exp_name"] == "exp-123"
    assert len(stored.data.tags["pipeline.id"]) == 12 and stored.data.tags["git.commit"]
    assert stored.data.params["split.train"] == "0.7" and stored.data.params["on_bad_modality"] == "keep_sample"
    process = {k: v for k, v in stored.data.metrics.items() if k.startswith("process.")}
    assert process.keys() >= {"process.wall_s", "process.peak_rss_mb"}  # mmpipe.resources, added on logging
    assert stored.data.metrics == {"kept": 7.0, "split.train": 5.0, "per_class.a b/c.train": 1.0, **process}
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)]
    assert artifacts == ["m.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # absolute artifact root, next to the store


def test_failed_stage_marks_run_failed(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PipelineError):
        with tracking.stage_run("collect", {"source": "x"}, system_metrics=False) as run:
            raise PipelineError("boom")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.get_run(run.run_id).info.status == "FAILED"


def test_a_store_failing_in_the_failure_path_leaves_the_stage_s_own_one_line_error(tmp_path, monkeypatch, capsys):
    """The stage fails with its one-line error; the tracking calls of the failure path (marking the
    runs FAILED) then fail too: warnings, never a traceback in place of the stage's error."""
    from mmpipe.stage import run_stage

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(retries, "BACKOFF_S", 0.01)

    def store_gone(*args, **kwargs):
        raise ConnectionError("the tracking server went away")

    def stage() -> None:
        with tracking.stage_run("clean", params.CleanParams(), system_metrics=False):
            monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", store_gone)
            monkeypatch.setattr(mlflow, "end_run", store_gone)
            raise PipelineError("data/raw: no part-*.parquet files (run the collect stage first)")

    with pytest.raises(SystemExit) as info:
        run_stage(stage)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: data/raw: no part-*.parquet files (run the collect stage first)"
    assert "warning: MLflow: could not mark the stage's run failed after 4 attempts: the tracking server went away" in err
    assert "warning: MLflow: could not mark the pipeline run failed after 4 attempts" in err
    mlflow.end_run()


def test_stage_script_reports_unreachable_server_without_traceback(tmp_path):
    from conftest import ROOT, stage_env

    env = stage_env(ROOT)
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{closed_port()}"
    env["PYTHONPATH"] = str(ROOT)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.collect"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: MLflow tracking server http://127.0.0.1:")
    assert not (tmp_path / "data" / "raw").exists()


def test_stages_of_one_execution_share_a_pipeline_row_with_all_params_and_headline_metrics(tmp_path, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("clean: {min_per_class: 3}\nmodel: {fusion: gated, widths: [1, 2]}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/clean.json").write_text(json.dumps({"kept": 90, "rejected_samples": 10, "seconds": 1.5}))
    # a stale file of a *later* stage (from an earlier execution): not read when clean finishes
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"test": {"accuracy": 0.5}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-fusion")
    with tracking.stage_run("clean", params.CleanParams(), system_metrics=False) as clean:
        pass
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent_id = client.get_run(clean.run_id).data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "exp-fusion" and parent.data.tags["mmpipe.role"] == "pipeline"
    assert parent.data.params == {"clean.min_per_class": "3", "model.fusion": "gated", "model.widths": "[1, 2]"}
    assert parent.data.metrics == {"clean.kept": 90.0, "clean.rejected_samples": 10.0}
    assert parent.info.status == "FINISHED"

    # evaluate finishes: its file is now current; the same row is reused and updated
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"test": {"accuracy": 0.93, "f1_macro": 0.92},
                                                           "robustness": {"image": {"relative": 0.8}}}))
    with tracking.stage_run("evaluate", {"seed": 0}, system_metrics=False) as evaluate:
        pass
    assert client.get_run(evaluate.run_id).data.tags["mlflow.parentRunId"] == parent_id
    metrics = client.get_run(parent_id).data.metrics
    assert metrics == {"clean.kept": 90.0, "clean.rejected_samples": 10.0, "evaluate.test.accuracy": 0.93,
                       "evaluate.test.f1_macro": 0.92, "evaluate.robustness.image.relative": 0.8}

    with pytest.raises(PipelineError):
        with tracking.stage_run("compress", {"seed": 0}, system_metrics=False):
            raise PipelineError("boom")
    assert client.get_run(parent_id).info.status == "FAILED"
    rows = client.search_runs([parent.info.experiment_id], "tags.`mmpipe.role` = 'pipeline'")
    assert len(rows) == 1

    # another experiment (or params.yaml, or commit) is another execution: another row
    monkeypatch.setenv("DVC_EXP_NAME", "exp-other")
    with tracking.stage_run("clean", params.CleanParams(), system_metrics=False) as other:
        pass
    assert client.get_run(other.run_id).data.tags["mlflow.parentRunId"] != parent_id


def test_complete_pipeline_run_fills_the_row_from_every_metrics_file(tmp_path, monkeypatch):
    """What the summary stage does after DVC restored every stage from its cache: no stage ran."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text("model: {fusion: attention}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps({"test": {"accuracy": 0.9}}))
    (tmp_path / "metrics/compress.json").write_text(json.dumps({"shipped": {"file_bytes": 1234, "variant": "int8"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "plots/eval").mkdir(parents=True)
    (tmp_path / "plots/eval/robustness_text_fused.csv").write_text("level,typos\n0.0,0.9\n1.0,0.5\n")
    row = tracking.complete_pipeline_run()
    assert row.info.status == "FINISHED" and row.data.params == {"model.fusion": "attention"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert [a.path for a in client.list_artifacts(row.info.run_id, "eval")] == ["eval/robustness_text_fused.csv"]
    assert row.data.metrics == {"evaluate.test.accuracy": 0.9, "compress.shipped.file_bytes": 1234.0}
    assert row.info.run_name.startswith("pipeline-")
    again = tracking.complete_pipeline_run()  # same execution (commit, params, experiment): same row
    assert again.info.run_id == row.info.run_id


# ---------------------------------------------------------------- crashes, concurrency, flaky servers


def test_processes_creating_a_fresh_store_at_once_all_succeed(tmp_path):
    """What `dvc queue start --jobs N` does on a fresh clone: N stages open a store that does not exist yet."""
    from conftest import ROOT

    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONPATH": str(ROOT)}
    code = "from mmpipe import tracking; client, experiment = tracking._open_store(); print(experiment)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, created once
    # marked as a model-training experiment, so that MLflow's UI opens it on its runs, not on GenAI traces
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment(outs[0][0].strip())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_experiment_created_before_the_kind_tag_gets_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    old = client.create_experiment(tracking.DEFAULT_EXPERIMENT)
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking._experiment_id(client, tracking.DEFAULT_EXPERIMENT) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")  # a user's own choice stays
    tracking._experiment_id(client, tracking.DEFAULT_EXPERIMENT)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"


def test_runs_left_running_by_a_killed_stage_are_closed_as_killed(tmp_path, monkeypatch):
    import os
    import signal

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from conftest import ROOT

    victim = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mmpipe import tracking, params\n"
         "with tracking.stage_run('clean', params.CleanParams(), system_metrics=False) as run:\n"
         "    print(run.run_id, flush=True)\n    time.sleep(600)\n"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    run_id = victim.stdout.readline().strip()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nobody closed it
    with tracking.stage_run("collect", {"source": "x"}, system_metrics=False) as other:
        pass
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # another stage's run: left alone
    with tracking.stage_run("clean", params.CleanParams(), system_metrics=False) as live:
        assert mlflow.get_run(run_id).info.status == "KILLED"  # the stage ran again: closed
        # a run whose process is alive (this one) is never touched
        client, experiment = tracking._open_store()
        assert tracking.close_abandoned_runs(client, experiment, "clean") == []
        assert mlflow.get_run(live.run_id).info.status == "RUNNING"
    assert mlflow.get_run(other.run_id).info.status == "FINISHED"


def test_a_failing_tracking_call_per_epoch_does_not_stop_the_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(retries, "BACKOFF_S", 0.01)
    calls = []

    def flaky(self, run_id, metrics=(), **kwargs):  # what a tracking server answering 503 does to the client
        calls.append(metrics[0].step)
        raise ConnectionError("503 Service Unavailable from https://bob:secret@tracking.example/api")
    with tracking.stage_run("train", {"epochs": 3}, system_metrics=False) as run:
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", flaky)
        for epoch in range(3):
            run.log_metrics({"loss": 1.0 / (epoch + 1)}, step=epoch)  # best effort: no exception
        with pytest.raises(PipelineError) as info:  # final metrics: retried, then one line
            run.log_metrics({"accuracy": 0.9})
    assert len(calls) == 4 * (retries.RETRIES + 1)  # every call retried, with backoff
    assert str(info.value).startswith(f"MLflow: could not log metrics after {retries.RETRIES + 1} attempts: 503")
    assert "secret" not in str(info.value) and "***" in str(info.value)
    out = capsys.readouterr().out
    assert out.count("warning: MLflow: could not log step") == 1  # said once, not per epoch


def test_credentials_in_the_tracking_uri_never_appear_in_messages():
    uri = f"http://alice:hunter2@127.0.0.1:{closed_port()}/?token=xyz"
    with pytest.raises(PipelineError) as info:
        tracking.check_reachable(uri, timeout_s=2)
    assert "hunter2" not in str(info.value) and "xyz" not in str(info.value)
    assert str(info.value).startswith("MLflow tracking server http://***@127.0.0.1:")


def test_make_ui_address_opens_the_experiment_on_its_training_runs(tmp_path):
    """MLflow 3.x's UI opens an experiment on its GenAI overview unless the address says model training
    (its GenAI / Model training switch wins over the experiment's kind tag): the address `mmpipe ui`
    (`make ui`) prints says so. (Checked once in headless Chromium: docs/troubleshooting in the README.)"""
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    mmpipe = Path(sys.executable).with_name("mmpipe")  # the console command pyproject.toml installs
    proc = subprocess.run([str(mmpipe), "ui", "--url-only", "--port", "5123"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    experiment = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert proc.stdout.strip().endswith(
        f"http://127.0.0.1:5123/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
