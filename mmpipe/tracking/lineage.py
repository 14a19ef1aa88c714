"""Dataset lineage in MLflow: which data a run used, named by DVC's own hashes.

Each split (train / val / test) is logged as an MLflow dataset input (``mlflow.log_input``): its
rows (sample id, label, group, which modalities it has: the schema and row count the UI shows), its
*digest* derived from the DVC hashes of ``data/clean`` and every ``data/features/<modality>`` as
``dvc.lock`` records them (so two runs on the same data show the same digest, and ``dvc.lock`` of a
commit or experiment says which data that was), and its *source*: the pipeline's ``data.source``
(a local manifest, a URL, or the built-in corpus generator). The DVC hashes themselves are tags of
the input.

A folder whose files no longer match its ``dvc.lock`` entry (a stage run by hand, outside DVC) is
not named by that stale hash: the digest falls back to the content of the feature sets' index and
state files, and the input says so (tag ``dvc.hashes: stale``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from mmpipe.errors import redact
from mmpipe.layout import CLEAN, FEATURES, SOURCE
from mmpipe.names import features_digest
from mmpipe.tracking.retries import best_effort

CONTEXT = {"train": "training", "val": "validation", "test": "testing"}  # mlflow.data.context of each split
_COLUMNS = ["sample_id", "label", "split", "group"]  # + <modality>_available


def _matches(folder: Path, entry: dict) -> bool:
    """The folder still holds what dvc.lock recorded (file count and bytes: cheap, no hashing)."""
    if not folder.is_dir():
        return False
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files) == entry.get("nfiles") and sum(p.stat().st_size for p in files) == entry.get("size")


def _data_folders(root: Path) -> set[str]:
    """The folders a trained model's data is: data/clean and each data/features/<modality>."""
    return {str(CLEAN)} | {str(p.relative_to(root)) for p in (root / FEATURES).glob("*") if p.is_dir()}


def dvc_hashes(root: Path = Path(".")) -> dict[str, str]:
    """``{path: md5}`` from ``root/dvc.lock`` for data/clean and each data/features/<modality> whose
    files still match the recorded count and size; ``{}`` without a dvc.lock."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    wanted = _data_folders(root)
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if out.get("path") in wanted and _matches(root / out["path"], out):
                hashes[out["path"]] = out["md5"]
    return dict(sorted(hashes.items()))


def data_identity(root: Path = Path(".")) -> dict[str, Any]:
    """``{"digest": ..., "hashes": {path: md5}, "complete": bool}`` of the data a stage reads: the DVC
    hashes when dvc.lock matches every folder, else a content digest of the feature sets."""
    hashes = dvc_hashes(root)
    complete = set(hashes) == _data_folders(root)
    basis = json.dumps(hashes, sort_keys=True) if complete else features_digest(root / FEATURES)
    return {"digest": hashlib.md5(basis.encode()).hexdigest(), "hashes": hashes, "complete": complete}


def _source(root: Path) -> Any:
    """The MLflow dataset source of ``data.source`` (as the source stage recorded it)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    try:
        recorded = json.loads((root / SOURCE).read_text())
    except (OSError, ValueError):
        recorded = {}
    source = redact(str(recorded.get("source", "unknown")))
    if recorded.get("kind") != "builtin" and source != "unknown":
        try:
            return resolve_dataset_source(str(Path(source).resolve()) if "://" not in source else source)
        except Exception:  # a protocol MLflow has no source type for (e.g. an fsspec one): named as below
            pass
    return CodeDatasetSource({"data.source": source, "generator": str(recorded.get("generator", ""))})


def split_datasets(splits: list[str], root: Path = Path(".")) -> list[tuple[Any, str, dict[str, str]]]:
    """``[(mlflow dataset, context, tags)]`` for ``splits``: the rows of data/clean in each split."""
    import mlflow
    import pandas as pd
    import pyarrow.dataset as ds

    identity = data_identity(root)
    table = ds.dataset(root / CLEAN / "samples", format="parquet")
    columns = [c for c in table.schema.names if c in _COLUMNS or c.endswith("_available")]
    frame = table.to_table(columns=columns).to_pandas()
    source = _source(root)
    tags = {f"dvc.{path}": md5 for path, md5 in identity["hashes"].items()}
    tags["dvc.hashes"] = "dvc.lock" if identity["complete"] else "stale"
    out = []
    for split in splits:
        rows = frame[frame["split"] == split].drop(columns="split").reset_index(drop=True)
        digest = hashlib.md5(f"{identity['digest']}:{split}".encode()).hexdigest()
        dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, targets="label", name=split, digest=digest)
        out.append((dataset, CONTEXT.get(split, split), tags))
    return out


def dataset_inputs(splits: list[str], root: Path = Path(".")) -> list[Any]:
    """The splits as MLflow ``DatasetInput`` entities (for ``MlflowClient.log_inputs``)."""
    from mlflow.entities import DatasetInput, InputTag

    return [DatasetInput(dataset._to_mlflow_entity(),
                         [InputTag("mlflow.data.context", context), *(InputTag(k, v) for k, v in tags.items())])
            for dataset, context, tags in split_datasets(splits, root)]


def log_splits(run_id: str, splits: list[str], client: Any = None, root: Path = Path(".")) -> None:
    """Log ``splits`` as dataset inputs of run ``run_id`` (best effort: lineage is metadata, a problem
    with it is one warning line); nothing without data/clean."""
    from mlflow.tracking import MlflowClient


    if not (root / CLEAN / "samples").is_dir():
        return
    try:
        inputs = dataset_inputs(splits, root)
    except (OSError, ValueError, KeyError) as exc:
        print(f"warning: dataset lineage not logged: {redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}")
        return
    best_effort("log dataset inputs", (client or MlflowClient()).log_inputs, run_id, inputs)
