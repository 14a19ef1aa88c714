"""Publishing a verified bundle to the MLflow Model Registry, and the promotion policy.

A bundle is registered as a pyfunc model version once per *content* (``bundle_digest``: every file
but the model card, the manifest without its build facts): registering an identical bundle again is
a no-op that names the version it already is. The serving alias (``champion``) moves to a new
version only when the policy allows it (``export.move_alias``; ``decide``): with ``gated``, a
quality gate configured and passed, the main workspace (not a queued/temp DVC experiment), and the
candidate at least as accurate as the current champion **on the same test data**: the champion's
own bundle, downloaded from the registry, is run on today's raw test files next to the candidate,
so a model evaluated on other data (or before the data changed: said so) is never compared by
numbers that do not measure the same thing.

Registration happens after the bundle reached ``artifacts/deploy`` (never from a temporary folder),
in a logged model created first and finalized last: a failure marks it FAILED and removes the
version it had made; a process killed mid-way leaves a PENDING model that the next export marks
FAILED (``fail_abandoned``, by the process tags every run of the project carries: host, pid, start).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from mmpipe.deploy.mlflow_model import NUMERIC_OUTPUTS, OUTPUTS, target_type
from mmpipe.errors import redact
from mmpipe.modalities.portable import describe

MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"
DIGEST_TAG = "bundle.digest"
NOT_CONTENT = ("MODEL_CARD.md", "manifest.json")  # the card quotes latencies; the manifest is hashed apart


def bundle_digest(folder: Path) -> str:
    """The bundle's content: every file's checksum but the card's, and the manifest without its build
    facts (versions, git commit): two exports of the same model and preprocessing are one digest."""
    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    manifest.pop("versions", None)
    manifest["files"] = {k: v for k, v in manifest.get("files", {}).items() if k not in NOT_CONTENT}
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- the policy


def gates_allow(policy: str, eval_metrics: dict, cwd: Path | None = None) -> tuple[bool, str]:
    """The part of the decision that needs no registry: ``always`` / ``never``; ``gated``: a quality
    gate configured (evaluate.gates) and passed, in the main workspace."""
    if policy == "never":
        return False, "export.move_alias is never"
    if policy == "always":
        return True, "export.move_alias is always"
    gates = eval_metrics.get("gates", {})
    if not gates.get("checked"):
        return False, "no quality gate is configured (evaluate.gates): nothing vouches for this model"
    if not gates.get("passed"):
        return False, "a quality gate failed"
    from mmpipe.tracking import in_experiment_workspace

    if in_experiment_workspace(cwd):
        return False, "this run is a DVC experiment in a temporary workspace (queue/temp), not the main workspace"
    bars = [f"{name} {'<=' if k.startswith('max') else '>='} {bar}" for k, v in gates["checked"].items()
            for name, bar in (v.items() if isinstance(v, dict) else [(k, v)])]  # min: {r2: 0.6} -> "r2 >= 0.6"
    return True, "quality gates " + ", ".join(bars) + " passed in the main workspace"


def decide(policy: str, eval_metrics: dict, candidate: float, champion: dict | None,
           cwd: Path | None = None) -> tuple[bool, str]:
    """Whether the alias moves to the candidate, and why (one line). ``candidate``: its accuracy on
    the raw test files; ``champion``: ``champion_score``'s answer (None: no champion yet)."""
    allowed, why = gates_allow(policy, eval_metrics, cwd)
    if not allowed or policy == "always" or champion is None:
        return allowed, why + ("; no current champion" if allowed and champion is None else "")
    if not champion["fetched"]:
        return False, f"champion version {champion['version']} could not be scored ({champion['why']}): alias not moved"
    if champion["accuracy"] is None:  # its classes or inputs are not today's: nothing to compare
        return True, f"{why}; champion version {champion['version']} not comparable ({champion['why']})"
    changed = f" (the test data changed since version {champion['version']} was registered)" if champion["data_changed"] else ""
    versus = (f"{candidate:.4f} vs champion version {champion['version']}'s {champion['accuracy']:.4f} on the same "
              f"{champion['items']} raw test files{changed}")
    if candidate < champion["accuracy"]:
        return False, f"not better than the champion: {versus}"
    return True, f"{why}; at least as accurate as the champion: {versus}"


def champion_score(name: str, alias: str, score: Callable[[Path], tuple[float | None, int, str]],
                   data_digest: str) -> dict | None:
    """The current ``alias`` version of ``name`` scored on today's test data: its bundle downloaded
    from the registry and run by ``score`` (a bundle folder -> (accuracy or None when not comparable,
    items, why)). None when there is no such alias (or no such model)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    import mlflow

    out = {"version": str(version.version), "accuracy": None, "items": 0, "fetched": False,
           "data_changed": version.tags.get("data.digest", data_digest) != data_digest}
    with tempfile.TemporaryDirectory(prefix="mmpipe-champion-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp))
        except Exception as exc:  # the artifact store unreachable: nothing says the candidate is better
            return out | {"why": f"its bundle could not be fetched: {redact(describe(exc))}"}
        bundles = [p.parent for p in local.rglob("predict.py") if (p.parent / "manifest.json").exists()]
        out["fetched"] = True
        if not bundles:
            return out | {"why": "its model holds no bundle"}
        try:
            accuracy, items, why = score(bundles[0])
        except Exception as exc:  # a bundle of another age that cannot take today's data
            return out | {"why": f"its bundle does not run on today's test files: {redact(describe(exc))}"}
    return out | {"accuracy": accuracy, "items": items, "why": why}


# --------------------------------------------------------------------------- the registry


def find_version(name: str, digest: str):
    """The registered version of ``name`` whose bundle has ``digest``, or None."""
    from mlflow import MlflowClient

    found = MlflowClient().search_model_versions(f"name = '{name}' and tags.`{DIGEST_TAG}` = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def fail_abandoned(experiment_id: str) -> list[str]:
    """Mark FAILED the logged models an export on this host left PENDING when it was killed (its pid
    no longer runs, or is now another process: the tag records the start time too); -> their ids."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    from mmpipe.tracking import holder_alive, process_tags

    client, host, failed = MlflowClient(), process_tags()["mmpipe.host"], []
    token = None
    while True:
        page = client.search_logged_models([experiment_id], filter_string=f"tags.`mmpipe.host` = '{host}'", page_token=token)
        for model in page:  # the tags of tracking.process_tags: host, pid and its start time (pids are reused)
            if model.status == LoggedModelStatus.PENDING and not holder_alive(model.tags):
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                failed.append(model.model_id)
        token = page.token
        if not token:
            return failed


def register(folder: Path, name: str, example: Any, metrics: dict[str, float] | None = None,
             tags: dict[str, str] | None = None, test_dataset: Any = None) -> dict[str, Any]:
    """Log the bundle in ``folder`` as an MLflow pyfunc model in the active run and register it as
    ``name`` (no alias: ``point_alias`` does that). The version's description is the bundle's model
    card; ``tags`` (commit, experiment, data digest, variant, bundle digest) go on the logged model
    and the version; ``metrics`` are linked to the logged model (and to ``test_dataset``). A failure
    on the way marks the logged model FAILED and deletes the version it had made."""
    from importlib import metadata

    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.models.signature import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import ColSpec, Schema

    kind = target_type(json.loads((Path(folder) / "manifest.json").read_text()))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", column, required=False) for column in example.columns]),
        outputs=Schema([ColSpec("double" if column in NUMERIC_OUTPUTS else "string", column,
                                required=column not in NUMERIC_OUTPUTS) for column in OUTPUTS[kind]]))
    requirements = [f"{dist}=={metadata.version(dist)}" for dist in ("mlflow", "pandas", "pyarrow")]
    requirements += (Path(folder) / "requirements.txt").read_text().split()  # the bundle's own
    tags = dict(tags or {})
    client = MlflowClient()
    from mmpipe.tracking import process_tags

    model = mlflow.initialize_logged_model(name="model", source_run_id=mlflow.active_run().info.run_id,
                                           tags={**tags, **process_tags()})  # so that a later export tells a killed one
    version = None
    try:
        info = mlflow.pyfunc.log_model(name="model", model_id=model.model_id, python_model=str(MODEL_CODE),
                                       artifacts={"bundle": str(folder)}, signature=signature, input_example=example,
                                       pip_requirements=requirements)
        version = mlflow.register_model(f"models:/{info.model_id}", name, tags=tags).version
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id, dataset=test_dataset)
        client.update_model_version(name, version, description=(Path(folder) / "MODEL_CARD.md").read_text())
    except BaseException:
        if version is not None:
            client.delete_model_version(name, version)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return {"registered_model": name, "version": str(version), "model_id": info.model_id,
            "model_uri": f"models:/{name}/{version}"}


def point_alias(name: str, alias: str, version: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


def publish(folder: Path, name: str, alias: str, policy: str, eval_metrics: dict, candidate_accuracy: float,
            example: Any, score: Callable[[Path], tuple[float | None, int, str]], data_digest: str,
            metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
            test_dataset: Any = None) -> dict[str, Any]:
    """Register the bundle in ``folder`` as ``name`` unless an identical one is (then nothing changes),
    and point ``alias`` at it when ``decide`` says so. ``score``: how a bundle folder scores on today's
    raw test files (for the champion's); ``candidate_accuracy``: this bundle's score there. Runs in the
    active MLflow run; first marks FAILED what killed exports left PENDING. -> what was done and why."""
    import mlflow

    abandoned = fail_abandoned(mlflow.active_run().info.experiment_id)
    digest = bundle_digest(folder)
    same = find_version(name, digest)
    if same is not None:
        return {"registered_model": name, "version": str(same.version), "registered": False, "alias": None,
                "alias_moved": False, "abandoned_marked_failed": abandoned,
                "alias_decision": f"identical to version {same.version} (bundle digest {digest[:12]}): nothing "
                                  "registered, alias unchanged"}
    allowed, _ = gates_allow(policy, eval_metrics)
    champion = champion_score(name, alias, score, data_digest) if allowed and policy == "gated" else None
    move, why = decide(policy, eval_metrics, candidate_accuracy, champion)
    out = register(folder, name, example, metrics, {**(tags or {}), DIGEST_TAG: digest, "data.digest": data_digest},
                   test_dataset)
    if move:
        point_alias(name, alias, out["version"])
    return out | {"registered": True, "alias": alias if move else None, "alias_moved": move, "alias_decision": why,
                  "champion_before": champion, "abandoned_marked_failed": abandoned}
