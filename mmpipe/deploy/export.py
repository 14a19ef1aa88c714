"""The export stage's work: build the bundle, then prove it computes what the pipeline evaluated.

Verification (metrics/export.json):
- fp32 ONNX vs PyTorch: max |logit difference| on the first ``parity_samples`` test samples;
- shipped (e.g. int8) vs fp32 ONNX: top-1 agreement on the test split;
- the standalone predictor, run on the **raw** test files (as collected, before clean) through its
  own preprocessing, with the shipped and the fp32 model: accuracy, next to the evaluate stage's
  accuracy (PyTorch on the pipeline's features) and compress's test accuracy of the shipped variant.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmpipe.compress.onnx_model import onnx_feeds, run_logits, session
from mmpipe.data.clean import DATASET_FILE, SAMPLES_DIR
from mmpipe.deploy import bundle
from mmpipe.errors import PipelineError
from mmpipe.features.loader import FeatureSet
from mmpipe.io import iter_row_groups
from mmpipe.models.train import load_model, to_model_inputs

if TYPE_CHECKING:
    import pandas as pd


def load_predictor(folder: Path):
    """The bundle's own predict.py, imported from the bundle folder (not from this package)."""
    spec = importlib.util.spec_from_file_location("bundle_predict", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_test_items(raw_dir: Path, clean_dir: Path, sample_ids: np.ndarray, modalities: list[str]) -> list[dict]:
    """For each sample id: the raw bytes of each modality that clean kept (None where it did not)."""
    kept: dict[str, dict[str, bool]] = {}
    wanted = set(sample_ids.tolist())
    for path in sorted((clean_dir / SAMPLES_DIR).glob("part-*.parquet")):
        for table in iter_row_groups(path, ["sample_id", *(f"{m}_available" for m in modalities)]):
            for row in table.to_pylist():
                if row["sample_id"] in wanted:
                    kept[row["sample_id"]] = {m: row[f"{m}_available"] for m in modalities}
    raw: dict[str, dict] = {}
    for path in sorted(raw_dir.glob("part-*.parquet")):
        for table in iter_row_groups(path, ["sample_id", *modalities]):
            for row in table.to_pylist():
                if row["sample_id"] in wanted and row["sample_id"] not in raw:
                    raw[row["sample_id"]] = row
    missing = wanted - set(raw)
    if missing:
        raise PipelineError(f"{raw_dir}: test sample {sorted(missing)[0]} not found in the raw data (re-run collect)")
    return [{m: raw[sid][m] if kept[sid][m] else None for m in modalities} for sid in sample_ids]


def verify(folder: Path, model: torch.nn.Module, test: FeatureSet, items: list[dict], parity_samples: int,
           quantized_from: Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Check the bundle in ``folder`` against the PyTorch ``model`` on the ``test`` split, whose raw
    inputs are ``items`` (raw_test_items). ``quantized_from``: the fp32 ONNX model the shipped int8
    one was quantized from (None: not int8)."""
    modalities = model.modalities
    batch = test.get(np.arange(min(parity_samples, len(test))))
    with torch.no_grad():
        torch_logits = model(to_model_inputs(batch, modalities, torch.device("cpu"))).numpy()
    fp32 = session(folder / "model_fp32.onnx")
    onnx_logits = run_logits(fp32, onnx_feeds(batch, modalities))
    everything = onnx_feeds(test.get(np.arange(len(test))), modalities)
    fp32_top1 = run_logits(fp32, everything).argmax(axis=1)
    shipped_top1 = run_logits(session(folder / "model.onnx"), everything).argmax(axis=1)
    base_top1 = run_logits(session(quantized_from), everything).argmax(axis=1) if quantized_from else shipped_top1

    predict = load_predictor(folder)
    accuracy, errors = {}, []
    for which in ("shipped", "fp32"):
        predictor = predict.Predictor(folder, model=which)
        samples = []
        for sid, item in zip(test.sample_ids, items):
            try:
                samples.append(predictor.features(**item))
            except predict.InputError as exc:
                errors.append(f"{sid}: {exc}")
                samples.append(predictor.features())  # counted as a miss below unless the model guesses right
        labels = []
        for start in range(0, len(samples), batch_size):
            labels += [p["label"] for p in predictor.predict(samples[start:start + batch_size])]
        names = test.label_names
        accuracy[which] = float(np.mean([label == names[y] for label, y in zip(labels, test.labels)]))
    return {"parity_samples": len(batch["label"]),
            "fp32_onnx_vs_pytorch_max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
            "shipped_vs_fp32_top1_agreement": float((fp32_top1 == shipped_top1).mean()),
            "int8_vs_its_fp32_top1_agreement": float((base_top1 == shipped_top1).mean()) if quantized_from else None,
            "predictor_raw_test_accuracy": accuracy["shipped"],
            "predictor_raw_test_accuracy_fp32": accuracy["fp32"],
            "predictor_input_errors": sorted(set(errors))}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def model_card(dataset: dict, eval_metrics: dict, compress_metrics: dict, chosen: str) -> str:
    t, v = eval_metrics["test"], compress_metrics["variants"]
    shipped = v[chosen]
    lines = [
        "# Model card: multimodal digit classifier (image + text + audio)",
        "",
        "## What it does",
        f"Classifies a sample into one of {len(dataset['labels'])} classes ({', '.join(dataset['labels'])}) from any "
        "subset of: an image, a short text, an audio clip. Missing modalities are allowed (the model was trained "
        "with random modality dropout and has a learned placeholder for each).",
        "",
        "## Data",
        f"{dataset['samples']:,} samples after cleaning (splits: "
        + ", ".join(f"{k} {n:,}" for k, n in dataset["splits"].items())
        + "). Splits are assigned by sample id; the test split was used only for the numbers below.",
        "",
        "## Quality (test split)",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| fused, PyTorch fp32 (evaluate stage) | {100 * t['accuracy']:.2f} % |",
        f"| shipped ONNX `{chosen}` (compress stage) | {100 * shipped['test_accuracy']:.2f} % |",
        *[f"| {m} only (baseline) | {100 * b['accuracy']:.2f} % |" for m, b in eval_metrics["baselines"].items()],
        "",
        f"Macro F1 {t['f1_macro']:.4f}; expected calibration error {t['ece']:.4f}.",
        "",
        "With only some modalities: " + ", ".join(f"{k} {100 * x['accuracy']:.1f} %" for k, x in eval_metrics["missing"].items()) + ".",
        "",
        "Relative robustness (area under accuracy vs noise level 0..1, one modality corrupted): "
        + ", ".join(f"{m} {r['relative']:.3f}" for m, r in eval_metrics["robustness"].items()) + ".",
        "",
        "## The shipped model",
        f"`model.onnx` is the `{chosen}` variant: {shipped['file_bytes'] / 1e6:.2f} MB, "
        f"{shipped['macs_per_sample'] / 1e6:.1f} M multiply-accumulates per sample, "
        f"batch-32 CPU latency p50 {shipped['latency_ms']['batch_32']['p50']:.2f} ms on the build machine "
        f"({compress_metrics['threads']} threads). `model_fp32.onnx` is the unpruned fp32 export "
        f"({v['fp32']['file_bytes'] / 1e6:.2f} MB).",
        "",
        "## Limits",
        "- Trained on the data named in the pipeline's `data.source`; inputs unlike it (other languages, image styles, "
        "recording conditions) are outside what was measured.",
        "- Audio is resampled by the predictor with an FFT resampler, the pipeline used soxr: features differ "
        "slightly for files not at the training sample rate (the verification below measures the effect).",
        "- Probabilities are not perfectly calibrated (ECE above).",
        "",
        "## Use",
        "```",
        "pip install -r requirements.txt",
        "python predict.py --image digit.png --audio digit.wav --text seven",
        "python predict.py --manifest samples.csv",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(params, out: Path, compressed: Path, model_dir: Path, features_root: Path, raw_dir: Path,
           clean_dir: Path, eval_metrics: dict, compress_metrics: dict) -> tuple[dict[str, Any], "pd.DataFrame"]:
    """Build and verify the bundle in ``out``. Returns the checks (metrics/export.json) and an input
    example for the MLflow model (a raw test sample)."""
    dataset = json.loads((clean_dir / DATASET_FILE).read_text())
    chosen = compress_metrics["chosen"]
    model = load_model(model_dir)
    modalities = model.modalities
    test = FeatureSet(features_root, split="test")
    items = raw_test_items(raw_dir, clean_dir, test.sample_ids, modalities)
    card = model_card(dataset, eval_metrics, compress_metrics, chosen)
    manifest = bundle.build(out, compressed, chosen, features_root, dataset, modalities, card, git_commit())
    base = compress_metrics["variants"][chosen].get("from")  # int8: the fp32 variant (fp32 or pruned) it came from
    checks = verify(out, model, test, items, params.parity_samples, compressed / f"{base}.onnx" if base else None)
    checks |= {"evaluate_test_accuracy": eval_metrics["test"]["accuracy"],
               "compress_test_accuracy_shipped": compress_metrics["variants"][chosen]["test_accuracy"],
               "shipped_variant": chosen, "bundle_files": len(manifest["files"]),
               "bundle_bytes": sum((out / name).stat().st_size for name in manifest["files"])}
    checks["predictor_gap_vs_evaluate"] = checks["predictor_raw_test_accuracy_fp32"] - checks["evaluate_test_accuracy"]
    with open(out / "MODEL_CARD.md", "a") as fh:
        fh.write("## Verification (export stage)\n\n"
                 f"- fp32 ONNX vs PyTorch, {checks['parity_samples']} test samples: max |logit difference| "
                 f"{checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.2e}\n"
                 f"- shipped vs unpruned fp32 top-1 agreement (test): {100 * checks['shipped_vs_fp32_top1_agreement']:.2f} %"
                 + (f"; int8 vs the fp32 model it was quantized from: {100 * checks['int8_vs_its_fp32_top1_agreement']:.2f} %"
                    if checks["int8_vs_its_fp32_top1_agreement"] is not None else "") + "\n"
                 f"- this predictor on the raw test files: {100 * checks['predictor_raw_test_accuracy']:.2f} % "
                 f"(fp32 model: {100 * checks['predictor_raw_test_accuracy_fp32']:.2f} %; evaluate stage: "
                 f"{100 * checks['evaluate_test_accuracy']:.2f} %)\n")
    manifest["files"]["MODEL_CARD.md"] = bundle.sha256(out / "MODEL_CARD.md")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return checks, example_request(items)


def failed_checks(checks: dict, params) -> list[str]:
    failed = []
    if checks["fp32_onnx_vs_pytorch_max_abs_logit_diff"] > params.max_abs_logit_diff:
        failed.append(f"export check failed: fp32 ONNX differs from PyTorch by {checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.2e} "
                      f"(> export.max_abs_logit_diff {params.max_abs_logit_diff})")
    if abs(checks["predictor_gap_vs_evaluate"]) > params.max_predictor_accuracy_gap:
        failed.append(f"export check failed: the predictor on raw test files scores "
                      f"{checks['predictor_raw_test_accuracy_fp32']:.4f} with the fp32 model vs "
                      f"{checks['evaluate_test_accuracy']:.4f} in evaluate (> export.max_predictor_accuracy_gap "
                      f"{params.max_predictor_accuracy_gap})")
    return failed


MODEL_CODE = Path(__file__).resolve().parent / "mlflow_model.py"


def example_request(items: list[dict]) -> "pd.DataFrame":
    """An input example for the MLflow model: the first raw test sample that has all three modalities."""
    import base64

    import pandas as pd

    item = next((it for it in items if all(it[m] is not None for m in ("image", "audio", "text"))), items[0])
    return pd.DataFrame([{"image": base64.b64encode(item["image"]).decode() if item["image"] else "",
                          "audio": base64.b64encode(item["audio"]).decode() if item["audio"] else "",
                          "text": item["text"].decode("utf-8") if item["text"] else ""}])


def register(folder: Path, name: str, alias: str, example: "pd.DataFrame") -> dict[str, Any]:
    """Log the bundle as an MLflow pyfunc model in the active run, register it as ``name`` and point
    ``alias`` at the new version. Returns the model URI and version."""
    from importlib import metadata

    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", column, required=False) for column in ("image", "audio", "text")]),
        outputs=Schema([ColSpec("string", column) for column in ("label", "probabilities", "error")]))
    requirements = [f"{dist}=={metadata.version(dist)}" for dist in
                    ("mlflow", "pandas", "numpy", "onnxruntime", "soundfile", "pillow")]
    info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts={"bundle": str(folder)},
                                   signature=signature, input_example=example, registered_model_name=name,
                                   pip_requirements=requirements)
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, alias, version)
    return {"registered_model": name, "version": version, "alias": alias, "model_uri": f"models:/{name}@{alias}"}
