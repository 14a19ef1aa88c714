"""The MLflow tracking store: where it is, whether it answers, the experiment, and who holds a run.

The default store is a SQLite file at an *absolute* path in the main checkout, so runs started from
DVC's temporary experiment workspaces (``.dvc/tmp/exps/...``) land in the same store;
``MLFLOW_TRACKING_URI`` overrides it (e.g. a remote server), checked in one line before use.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from mmpipe.errors import PipelineError, redact

DEFAULT_EXPERIMENT = "mmpipe"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
_EXP_WORKSPACE = re.compile(r"^(.*?)/\.dvc/tmp/exps/")



def in_experiment_workspace(path: str | os.PathLike | None = None) -> bool:
    """True inside one of DVC's temporary experiment workspaces (``dvc exp run --queue/--temp``)."""
    return _EXP_WORKSPACE.match(Path(path or os.getcwd()).resolve().as_posix() + "/") is not None


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The main checkout: the nearest folder holding dvc.yaml, stepping out of DVC exp workspaces."""
    here = Path(start or os.getcwd()).resolve()
    match = _EXP_WORKSPACE.match(here.as_posix() + "/")
    if match:
        return Path(match.group(1))
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / ".dvc").is_dir():
            return folder
    return here


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / STORE_FILE}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact(uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname + (f":{parts.port}" if parts.port else "")  # no user:password@ in the request
    except (TypeError, ValueError):
        raise PipelineError(f"MLFLOW_TRACKING_URI {shown} is not a valid URL (e.g. http://host:5000)") from None
    url = urllib.parse.urlunsplit(parts._replace(netloc=host, path=parts.path.rstrip("/") + "/health"))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status >= 500:
                raise PipelineError(f"MLflow tracking server {shown} answered {resp.status} on /health")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise PipelineError(f"MLflow tracking server {shown} answered {exc.code} on /health") from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(
            f"MLflow tracking server {shown} is unreachable ({redact(str(reason))}); start it or unset MLFLOW_TRACKING_URI"
        ) from None


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)


# MLflow 3's UI opens an experiment it cannot classify on its GenAI overview (traces, tokens); this tag
# (the one its experiment-type selector writes) makes it open on the training runs instead.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # Artifacts next to the store, by absolute URI: a relative default would follow the cwd.
        location = (project_root() / ARTIFACTS_DIR).as_uri()
        uri = tracking_uri()
        if not uri.startswith("sqlite:"):
            location = None  # a server decides where artifacts go
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except Exception:  # another stage created it at the same moment
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():  # a store created before the tag (or a user's experiment)
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: one process at a time opens (and so creates or migrates) the file. Two
    processes creating a fresh store at once otherwise race in its schema migrations and fail."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _open_store() -> tuple[Any, str]:
    """(client, experiment id) of the tracking store, or one-line PipelineError."""
    uri = tracking_uri()
    check_reachable(uri)
    # bounded: about 1 + 2 + 4 s of backoff per call before our own retries take over
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    _quiet_mlflow_logs()
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        with store_lock(uri):
            mlflow.set_tracking_uri(uri)
            client = MlflowClient(uri)
            experiment_id = _experiment_id(client, os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    except Exception as exc:  # store unusable: say so in one line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"MLflow tracking store {redact(uri)} cannot be used: {redact(first)}") from None
    return client, experiment_id


def process_tags() -> dict[str, str]:
    """Which process holds a run RUNNING: so that a later stage can tell a live run from an abandoned one."""
    import psutil

    return {"mmpipe.host": socket.gethostname(), "mmpipe.pid": str(os.getpid()),
            "mmpipe.process_start": f"{psutil.Process().create_time():.3f}"}


def holder_alive(tags: dict[str, str]) -> bool:
    import psutil

    try:
        process = psutil.Process(int(tags["mmpipe.pid"]))
        return abs(process.create_time() - float(tags["mmpipe.process_start"])) < 1.0
    except (KeyError, ValueError, psutil.Error):
        return False
