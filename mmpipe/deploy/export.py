"""The export stage's work: build the bundle, verify it (``verify``), render its card once (``card``).

The steps: the bundle's files and manifest (``bundle.build``) -> its predictor, loaded from the bundle
itself -> the checks of ``verify`` (metrics/export.json) -> MODEL_CARD.md, with those checks, and the
manifest's file digests (``bundle.seal``). The registry (``registry``) takes it from there, in the stage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmpipe.compress.onnx_model import onnx_feeds, run_logits, session
from mmpipe.deploy import bundle
from mmpipe.deploy.card import model_card, verification_lines
from mmpipe.deploy.embeddings import raw_file_agreement, ship_embeddings
from mmpipe.deploy.verify import conversion_parity, load_predictor, raw_test_items, verify
from mmpipe.errors import PipelineError
from mmpipe.evaluate.evaluate import available_matrix
from mmpipe.features.loader import FeatureSet
from mmpipe.names import DATASET_FILE
from mmpipe.params import Calibration
from mmpipe.tracking import git_commit
from mmpipe.training.model_io import load_model, only_available
from mmpipe.trust import calibration, drift

if TYPE_CHECKING:
    import pandas as pd


def export(params, out: Path, compressed: Path, model_dir: Path, features_root: Path, raw_dir: Path,
           clean_dir: Path, eval_metrics: dict, compress_metrics: dict,
           source: str | None = None, calibration_cfg=None,
           aligned_dir: Path | None = None) -> tuple[dict[str, Any], "pd.DataFrame"]:
    """Build and verify the bundle in ``out``. Returns the checks (metrics/export.json) and an input
    example for the MLflow model (a raw test sample). ``source``: data.source (credentials redacted), the
    model card's dataset; ``calibration_cfg``: evaluate.calibration (None: its defaults); ``aligned_dir``: the
    pretrain stage's folder (its aligned encoders ship as embed.onnx: predict.py --embed / --search)."""
    calibration_cfg = calibration_cfg or Calibration()
    dataset = json.loads((clean_dir / DATASET_FILE).read_text())
    chosen = compress_metrics["chosen"]
    model = load_model(model_dir)
    modalities = model.modalities
    test = FeatureSet(features_root, split="test")
    items = raw_test_items(raw_dir, clean_dir, test.sample_ids, modalities)
    if "clean_rules" not in dataset:
        raise PipelineError(f"{clean_dir / DATASET_FILE} has no clean_rules (written by an older clean: re-run clean)")
    serving = {"max_rows_per_request": params.max_rows_per_request, "max_item_bytes": int(params.max_item_mb * 1e6),
               "max_request_bytes": int(params.max_request_mb * 1e6), "batch_size": params.predict_batch_size}
    commit = git_commit()
    manifest = bundle.build(out, compressed, chosen, features_root, dataset, modalities,
                            None if commit == "unknown" else commit, serving, model.target.describe())
    embedded = ship_embeddings(out, aligned_dir, model, test, params.parity_samples)  # when pretrain ran
    if embedded["shipped"]:
        manifest["embed"] = embedded.pop("manifest")
    # how far to trust each model of the bundle: its own calibration, on the validation split (its predictor applies it)
    for which, fitted in calibrate_bundle(out, manifest, model, features_root, calibration_cfg).items():
        manifest["models"][which]["calibration"] = fitted
    bundle.write_manifest(out, manifest)
    # the drift monitor's reference: the train split's statistics as the shipped model's predictor computes them
    reference = drift_reference(load_predictor(out).Predictor(out), model, features_root, params.monitor)
    (out / DRIFT_FILE).write_text(json.dumps(significant(reference), separators=(",", ":")) + "\n")
    manifest["monitor"] = {"file": DRIFT_FILE, "command": "python predict.py --monitor window.csv"} | {
        k: reference[k] for k in ("window_rows", "false_alarm", "false_alarm_measured", "threshold", "heldout_rows")}
    bundle.write_manifest(out, manifest)
    predictor = load_predictor(out).Predictor(out, model="fp32")  # its inputs: flags, columns, parity
    base = compress_metrics["variants"][chosen].get("from")  # int8: the fp32 variant (fp32 or pruned) it came from
    checks = verify(out, model, test, items, params.parity_samples, compressed / f"{base}.onnx" if base else None,
                    params.predict_batch_size)
    checks["conversion_parity"] = conversion_parity(out, predictor, features_root, dataset, model, test, items)
    if embedded["shipped"]:  # the bundle's embeddings of raw files vs the pipeline's of their features
        embedded |= raw_file_agreement(predictor, model, test, items, params.parity_samples)
    checks["embed"] = embedded
    h = model.target.HEADLINE  # accuracy, r2, f1_micro: every figure below is in it
    checks |= {f"evaluate_test_{h}": eval_metrics["test"][h],
               f"compress_test_{h}_shipped": compress_metrics["variants"][chosen][f"test_{h}"],
               "shipped_variant": chosen}
    checks["predictor_gap_vs_evaluate"] = checks[f"predictor_raw_test_{h}_fp32"] - checks[f"evaluate_test_{h}"]
    card = model_card(predictor, dataset, eval_metrics, compress_metrics, chosen, modalities, params.registered_model,
                      model.config["model"], model.target.describe(), source)
    bundle.seal(out, manifest, card + "\n".join(verification_lines(checks)) + "\n")
    checks |= {"bundle_files": len(manifest["files"]),
               "bundle_bytes": sum((out / name).stat().st_size for name in manifest["files"])}
    return checks, example_request(predictor, items)


MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"


def subset_logits(sess, batch: dict, model, modalities: list[str]) -> dict[tuple[str, ...], np.ndarray]:
    """An ONNX model's logits on ``batch`` with only each subset of ``modalities`` available (the empty one too)."""
    return {subset: run_logits(sess, onnx_feeds(only_available(batch, modalities, subset), model)).astype(np.float64)
            for subset in [(), *calibration.subsets(modalities)]}


def split_batch(features_root: Path, split: str, modalities: list[str]) -> tuple[FeatureSet, dict, np.ndarray]:
    """A split's feature set, its whole batch, and which of ``modalities`` each row has."""
    data = FeatureSet(features_root, split=split)
    batch = data.get(np.arange(len(data)))
    return data, batch, available_matrix(batch, modalities)


DRIFT_FILE = "drift_reference.json"


def significant(value: Any, digits: int = 10) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits: the reference's figures differ in the
    last bit between two exports of the same model (summation order), which changed the bundle's digest and made
    an identical bundle register again."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: significant(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [significant(v, digits) for v in value]
    return value


def split_statistics(predictor, model, features_root: Path, splits: list[str], chunk: int = 2048) -> dict[str, tuple]:
    """The drift monitor's per-row statistics (the bundle predictor's ``statistics``) of the feature arrays of
    ``splits``, a chunk of rows at a time: {name: (kind, values)}; NaN where a chunk has no row with the modality."""
    chunks = []
    for split in splits:
        data = FeatureSet(features_root, split=split)
        for start in range(0, len(data), chunk):
            feeds = onnx_feeds(data.get(np.arange(start, min(start + chunk, len(data)))), model)
            chunks.append((len(feeds["available"]), predictor.statistics(feeds)))
    kinds = {name: kind for _, stats in chunks for name, (kind, _) in stats.items()}
    return {name: (kind, np.concatenate([stats[name][1] if name in stats else np.full(rows, np.nan)
                                         for rows, stats in chunks]))
            for name, kind in sorted(kinds.items())}


def drift_reference(predictor, model, features_root: Path, cfg) -> dict[str, Any]:
    """The reference of the train split and the alarm threshold calibrated on the held-out splits (validation and
    test: data of the training data's kind that the reference did not see); mmpipe/trust/drift.py."""
    train = split_statistics(predictor, model, features_root, ["train"])
    heldout = split_statistics(predictor, model, features_root, ["val", "test"])
    return drift.fit({k: v for k, v in train.items() if v[0]}, {k: v for k, (_, v) in heldout.items()},
                     cfg.window_rows, cfg.windows, cfg.false_alarm)


def calibrate_bundle(out: Path, manifest: dict, model, features_root: Path, cfg) -> dict[str, dict]:
    """Each model file of the bundle (shipped, fp32) calibrated on the validation split as evaluate calibrates the
    PyTorch model (mmpipe/trust/calibration.py): its own logits, so an int8 model gets the thresholds of its own
    scores."""
    modalities = list(model.modalities)
    val, batch, available = split_batch(features_root, "val", modalities)
    fitted = {}
    for which, spec in manifest["models"].items():
        outputs = subset_logits(session(out / spec["file"]), batch, model, modalities)
        fitted[which] = calibration.fit(model.target, modalities,
                                        calibration.rows_by_pattern(available, outputs, modalities), val.labels,
                                        outputs[tuple(modalities)], cfg)
    return fitted


def example_request(predictor, items: Sequence[dict]) -> "pd.DataFrame":
    """An input example for the MLflow model: the first raw test sample that has every modality, as
    the request columns of the bundle's ``predictor``."""
    import base64

    import pandas as pd

    columns = predictor.request_columns()
    item = next((it for it in items if all(v is not None for v in it.values())), items[0])
    row: dict[str, Any] = {}
    for column, (m, kind) in columns.items():
        value = item.get(m)
        if kind == "record":
            value = json.loads(value) if value is not None else {}
            row[column] = None if value.get(column) is None else str(value[column])
        elif value is None:
            row[column] = ""
        else:
            row[column] = value.decode("utf-8") if kind == "string" else base64.b64encode(value).decode()
    return pd.DataFrame([row], columns=list(columns))


def model_metrics(checks: dict, eval_metrics: dict, compress_metrics: dict) -> dict[str, float]:
    """The figures a registered version carries (MLflow logged-model metrics: the Models page shows
    quality, size and latency per version): the test split's quality (the target's headline metric and its
    companions), the shipped file's size and CPU latency, and the bundle's own headline on the raw test files."""
    shipped, test = compress_metrics["shipped"], eval_metrics["test"]
    h = checks.get("headline", "accuracy")
    figures = {f"test_{h}": test[h],
               **{f"test_{k}": test[k] for k in ("f1_macro", "ece", "rmse", "mae", "map") if k in test and k != h},
               "fusion_gain": eval_metrics.get("fusion_gain"),
               f"shipped_test_{h}": shipped[f"test_{h}"], "file_bytes": shipped["file_bytes"],
               "latency_batch_1_p50_ms": shipped["batch_1_p50_ms"], "latency_batch_32_p50_ms": shipped["batch_32_p50_ms"],
               f"predictor_raw_test_{h}": checks[f"predictor_raw_test_{h}"]}
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
