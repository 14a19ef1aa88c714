"""MLflow tracking for stage executions.

One MLflow run per stage execution, tagged with the DVC stage, the DVC experiment, the git
commit and a pipeline id, and nested under one *pipeline run* per pipeline execution (same
pipeline id): the row to compare in the MLflow UI. The pipeline run holds every parameter of
params.yaml and the headline metrics of every stage (mmpipe.tracking.summary), refreshed from the metrics
files each time a stage finishes, so stages DVC restored from its cache still fill it.

Where the store is and the experiment: ``store``; per-step curves: ``curves``; retries: ``retries``;
which data a run used: ``lineage``; the headline figures of the pipeline row: ``summary``.

Robustness: the SQLite store is created by one process at a time (a file lock: ``dvc queue start
--jobs N`` on a fresh clone starts N stages at once); calls are retried with backoff on transient
errors, and per-epoch metrics are best effort (a failing tracking server never stops training: the
metrics files hold the numbers); runs that a killed stage left RUNNING are marked KILLED when the
stage next runs; credentials in the tracking URI never appear in a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from mmpipe import resources
from mmpipe.tracking import lineage, summary
from mmpipe.tracking.curves import Curves, curves, numeric_leaves  # noqa: F401  (re-exported)
from mmpipe.tracking.retries import best_effort, retrying  # noqa: F401  (re-exported)
from mmpipe.tracking.store import (ARTIFACTS_DIR, DEFAULT_EXPERIMENT, STORE_FILE, _experiment_id,  # noqa: F401
                                   _open_store, check_reachable, git_commit, holder_alive, in_experiment_workspace,
                                   process_tags, project_root, store_lock, tracking_uri)  # (re-exported)
from mmpipe.errors import PipelineError, redact
from mmpipe.io import flatten, write_json_atomic

PIPELINE_ROLE = "pipeline"  # tag mmpipe.role of the parent rows


def pipeline_id(params_file: str | os.PathLike = "params.yaml") -> str:
    """Groups the stage runs of one pipeline execution.

    ``MMPIPE_PIPELINE_ID`` wins; otherwise a digest of (DVC experiment, git commit, params.yaml),
    so every stage of one ``dvc repro`` / ``dvc exp run`` shares it without coordination.
    """
    if os.environ.get("MMPIPE_PIPELINE_ID"):
        return os.environ["MMPIPE_PIPELINE_ID"]
    digest = hashlib.sha1()
    digest.update(os.environ.get("DVC_EXP_NAME", "").encode())
    digest.update(git_commit().encode())
    with contextlib.suppress(OSError):
        digest.update(Path(params_file).read_bytes())
    return digest.hexdigest()[:12]


class StageRun:
    """Handle on the active MLflow run of a stage."""

    def __init__(self, run: Any):
        self.run = run
        self.run_id = run.info.run_id
        self._step_warned = False

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log numeric leaves. Step metrics (per epoch, per trial) are best effort: after the retries a
        failure prints one warning and the work goes on (the stage's metrics files hold the numbers).
        The run's own metrics only: a registered model's metrics are linked to it explicitly (export), not
        every later metric of the run that logged it, as MLflow's fluent API would."""
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        leaves = numeric_leaves(metrics)
        if not leaves:
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step or 0) for key, value in leaves.items()]

        def send() -> None:
            client = MlflowClient()
            for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
                client.log_batch(self.run_id, metrics=batch[start:start + 1000])
        if step is None:
            retrying("log metrics", send)
            return
        try:
            retrying(f"log step {step} metrics", send)
        except PipelineError as exc:
            if not self._step_warned:
                print(f"warning: {exc}; continuing without them (the stage's metrics files are complete)")
                self._step_warned = True

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        for key, value in tags.items():
            retrying(f"set tag {key}", MlflowClient().set_tag, self.run_id, key, value)

    def write_metrics(self, path: str | os.PathLike, metrics: dict[str, Any]) -> None:
        """The stage's metrics file (written atomically) with what the process used so far under ``process``
        (wall time since start, peak RSS / GPU memory, bytes written: mmpipe.resources), logged as metrics
        and as an artifact."""
        metrics = metrics | {"process": resources.usage()}
        write_json_atomic(path, metrics)
        self.log_metrics(metrics)
        self.log_artifact(path)

    def log_metrics_file(self, path: str | os.PathLike) -> None:
        """``write_metrics`` for a metrics file the stage already wrote."""
        self.write_metrics(path, json.loads(Path(path).read_text()))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        import mlflow

        path = Path(path)
        if path.is_dir():
            retrying(f"log {path}", mlflow.log_artifacts, str(path), artifact_path=artifact_path or path.name)
        elif path.exists():
            retrying(f"log {path}", mlflow.log_artifact, str(path), artifact_path=artifact_path)


def close_abandoned_runs(client: Any, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the runs of ``stage`` (and pipeline rows) left RUNNING on this host by a process that
    no longer exists: a stage killed by a signal, the OOM killer or a power cut never closes its run."""
    found = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`mmpipe.host` = "
                               f"'{socket.gethostname()}'", max_results=1000)
    closed = []
    for run in found:
        tags = run.data.tags
        if tags.get("mmpipe.stage") != stage and tags.get("mmpipe.role") != PIPELINE_ROLE:
            continue
        if holder_alive(tags):
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        print(f"mlflow: run {run.info.run_id} ({run.info.run_name}) was left RUNNING by a process that was killed: "
              "marked KILLED")
        closed.append(run.info.run_id)
    return closed


def execution_tags() -> dict[str, str]:
    return {"dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""), "git.commit": git_commit(),
            "pipeline.id": pipeline_id()}


@contextlib.contextmanager
def stage_run(stage: str, params: Any, system_metrics: bool = True) -> Iterator[StageRun]:
    """Open the MLflow run of one stage execution; params are logged at once, flattened."""
    client, experiment_id = _open_store()
    import mlflow

    if system_metrics:  # CPU/memory (and GPU via nvidia-ml-py) every few seconds
        mlflow.set_system_metrics_sampling_interval(5)
        mlflow.set_system_metrics_samples_before_logging(1)
    retrying("close runs left RUNNING by killed stages", close_abandoned_runs, client, experiment_id, stage)
    execution = execution_tags()
    tags = {"dvc.stage": os.environ.get("DVC_STAGE", stage), **execution, "mmpipe.stage": stage, **process_tags()}
    parent_id = retrying("open the pipeline run", pipeline_run, client, experiment_id, execution)
    run = retrying("start the stage's run", mlflow.start_run, experiment_id=experiment_id, run_name=stage, tags=tags,
                   log_system_metrics=system_metrics, parent_run_id=parent_id)
    try:
        retrying("log params", mlflow.log_params, _flat_params(params))
        yield StageRun(run)
    except BaseException:
        # the stage's own error is what the user must see: the store failing now is a warning, never
        # a traceback in its place (the next stage closes what is left RUNNING: close_abandoned_runs)
        best_effort("mark the stage's run failed", mlflow.end_run, "FAILED")
        best_effort("mark the pipeline run failed", client.set_terminated, parent_id, "FAILED")
        raise
    retrying("finish the stage's run", mlflow.end_run)
    retrying("update the pipeline run", update_pipeline_run, client, parent_id, stage)


TUNE_ROLE, TRIAL_ROLE = "tune", "trial"  # tag mmpipe.role of a study's row and of its trials (children)


@contextlib.contextmanager
def tune_run(study: str, params: Any) -> Iterator[StageRun]:
    """The MLflow row of hyperparameter study ``study``: one per study, reopened when the study resumes
    (its params are those of the run that created it; MLflow params cannot change). Trials are its
    children (``trial_run``)."""
    client, experiment_id = _open_store()
    import mlflow

    retrying("close runs left RUNNING by killed stages", close_abandoned_runs, client, experiment_id, "tune")
    found = retrying("find the study's row", client.search_runs, [experiment_id],
                     f"tags.`mmpipe.role` = '{TUNE_ROLE}' and tags.`tune.study` = '{study}'", max_results=1)
    tags = {"mmpipe.role": TUNE_ROLE, "mmpipe.stage": "tune", "tune.study": study, "git.commit": git_commit(),
            **process_tags()}
    if found:
        run = mlflow.start_run(run_id=found[0].info.run_id)
        retrying("tag the study's row", mlflow.set_tags, tags)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=f"tune-{study}", tags=tags)
        retrying("log params", mlflow.log_params, _flat_params(params))
    with run:
        yield StageRun(run)


@contextlib.contextmanager
def trial_run(study: str, number: int, values: dict[str, Any]) -> Iterator[StageRun]:
    """A child run of the active study row for trial ``number`` with its sampled ``values`` as params."""
    import mlflow

    tags = {"mmpipe.role": TRIAL_ROLE, "mmpipe.stage": "tune", "tune.study": study, "optuna.trial": str(number),
            **process_tags()}
    parent = mlflow.active_run()
    with mlflow.start_run(run_name=f"trial-{number}", nested=True, tags=tags,
                          experiment_id=parent.info.experiment_id if parent else None) as run:
        retrying("log params", mlflow.log_params, _flat_params(values))
        yield StageRun(run)


def mark_failed(run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    retrying("mark the run failed", MlflowClient().set_terminated, run_id, "FAILED")


def _row_inputs(uri: str, root: Path) -> str:
    """A digest of everything the pipeline row is made of: the execution (params.yaml, commit, DVC
    experiment), the store and experiment, every metrics file, the artifacts and the data's DVC hashes
    (lineage; not dvc.lock's bytes: DVC rewrites the always-changed stages' entries on every run)."""
    digest = hashlib.sha256(json.dumps([uri, os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT),
                                        execution_tags(), lineage.dvc_hashes(root)]).encode())
    files = [root / path for path in summary.METRICS_FILES]
    for local in summary.ARTIFACTS:
        path = root / local
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _store_stat(uri: str) -> list[int] | None:
    """(size, mtime) of a SQLite store's file: anything that wrote to the store since changes it."""
    with contextlib.suppress(OSError):
        stat = Path(uri[len("sqlite:///"):]).stat()
        return [stat.st_size, stat.st_mtime_ns]
    return None


def unchanged_pipeline_row() -> str | None:
    """The summary line of the last ``complete_pipeline_run`` when nothing it was made of has changed
    since (and nothing has written to the store): a no-op ``dvc repro`` then skips MLflow (its import
    and store checks are most of what an unchanged pipeline costs). Only for a SQLite store: a server's
    state cannot be checked without asking it. None: the row needs ``complete_pipeline_run``."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError):
        last = json.loads(Path(uri[len("sqlite:///"):] + ".summary").read_text())
        if last["inputs"] == _row_inputs(uri, Path.cwd()) and last["store"] == _store_stat(uri):
            return last["line"]
    return None


def remember_pipeline_row(line: str) -> None:
    """Record what the row now holds (``unchanged_pipeline_row``), after ``complete_pipeline_run``."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        record = {"inputs": _row_inputs(uri, Path.cwd()), "store": _store_stat(uri), "line": line}
        best_effort("remember the pipeline row", write_json_atomic, Path(uri[len("sqlite:///"):] + ".summary"), record)


def complete_pipeline_run() -> Any:
    """Create or refresh this execution's pipeline run with the headline metrics of *every* stage,
    and mark it finished: the summary stage, after the last stage, whether DVC ran or restored them."""
    client, experiment_id = _open_store()
    run_id = pipeline_run(client, experiment_id, execution_tags())
    for local, folder in summary.ARTIFACTS.items():
        path = Path(local)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), folder)
        elif path.is_file():
            client.log_artifact(run_id, str(path), folder)
    lineage.log_splits(run_id, ["train", "val", "test"], client)  # the execution's data
    update_pipeline_run(client, run_id, None)
    return client.get_run(run_id)


def _flat_params(params: Any) -> dict[str, Any]:
    """A params section (pydantic model or mapping) as MLflow params: ``split.train`` keys."""
    params_dict = params.model_dump(mode="json") if hasattr(params, "model_dump") else dict(params)
    return {k: _param_value(v) for k, v in flatten(params_dict).items()}


def _param_value(value: Any) -> Any:
    """A param as MLflow stores it: lists and mappings as JSON; text with any credential redacted
    (``data.source`` may be ``https://user:pass@host/...`` or carry a token in its query)."""
    value = json.dumps(value) if isinstance(value, (list, dict)) else value
    return redact(value) if isinstance(value, str) else value


def pipeline_run(client: Any, experiment_id: str, tags: dict[str, str], params_file: str = "params.yaml") -> str:
    """Id of the pipeline run of ``tags["pipeline.id"]`` (``tags``: the execution's, execution_tags);
    created, with every parameter of ``params_file`` (``section.key``), by the execution's first stage."""
    found = client.search_runs(
        [experiment_id], f"tags.`pipeline.id` = '{tags['pipeline.id']}' and tags.`mmpipe.role` = '{PIPELINE_ROLE}'",
        max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        for key, value in process_tags().items():  # the stage now holding the row open
            client.set_tag(found[0].info.run_id, key, value)
        return found[0].info.run_id
    import yaml
    from mlflow.entities import Param

    name = tags["dvc.exp_name"] or f"pipeline-{tags['git.commit'][:7]}-{tags['pipeline.id'][:6]}"
    run = client.create_run(experiment_id, run_name=name, tags=tags | {"mmpipe.role": PIPELINE_ROLE} | process_tags())
    with contextlib.suppress(OSError):
        values = flatten(yaml.safe_load(Path(params_file).read_text()) or {})
        params = [Param(k, str(_param_value(v))) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[start:start + 100])
    return run.info.run_id


def update_pipeline_run(client: Any, run_id: str, stage: str | None, root: Path | None = None) -> None:
    """Refresh the pipeline run's headline metrics from the metrics files of ``stage`` and the
    stages before it (every stage: None), and mark it finished (a later stage may reopen it)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary.stage_figures(root or Path.cwd(), stage).items()]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    client.set_terminated(run_id, "FINISHED")
