"""Proof that a bundle computes what the pipeline evaluated (the export stage's checks, metrics/export.json).

"Agreement" is in the target's terms (mmpipe/targets: ``agree``): a class, the same top-1; a number, within
1e-3 of the train values' standard deviation (one model on two paths; 5 % of it between two models: int8
vs fp32); a tag set, the same tags. "Accuracy" is the target's
headline metric (accuracy, R², micro-F1), the checks' keys name it.

- fp32 ONNX vs PyTorch: max |logit difference| on the first ``parity_samples`` test samples;
- shipped (e.g. int8) vs fp32 ONNX: agreement on the test split;
- the standalone predictor, run on the **raw** test files (as collected, before clean) through its
  own preprocessing, with the shipped and the fp32 model: its headline metric, next to the evaluate
  stage's (PyTorch on the pipeline's features) and compress's test figure of the shipped variant; and row
  by row, the fp32 predictor's answers against the fp32 model's on the pipeline's features (agreement);
- train/serve parity on the re-encodings users bring (a modality's ``PARITY_VARIANTS``; audio: each
  raw test clip converted to 22.05, 44.1 and 48 kHz stereo), featurised by the pipeline (clean ->
  preprocess) and by the bundle's predictor: the fp32 model's top-1 must agree on at least
  ``min_conversion_agreement`` of them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mmpipe.compress.onnx_model import onnx_feeds, run_logits, session
from mmpipe.errors import PipelineError
from mmpipe.evaluate.evaluate import available_matrix
from mmpipe.features.loader import FeatureSet
from mmpipe.io import iter_row_groups
from mmpipe.modalities import MODALITIES
from mmpipe.modalities.base import array_names
from mmpipe.modalities.portable import RejectedInput
from mmpipe.names import SAMPLES_DIR, STATE_FILE
from mmpipe.training.model_io import to_model_inputs
from mmpipe.trust import calibration


def load_predictor(folder: Path):
    """The bundle's own predict.py, imported from the bundle folder (not from this package)."""
    spec = importlib.util.spec_from_file_location("bundle_predict", folder / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RawItems(Sequence):
    """The raw test items, read on demand: item ``i`` is {modality: the raw bytes clean kept, or None} of
    ``sample_ids[i]``. Only where each one lies is held (file, row group, row); reading in order reads each
    row group once (one is cached), so memory is a row group, not the test split's files."""

    def __init__(self, raw_dir: Path, clean_dir: Path, sample_ids: np.ndarray, modalities: list[str]):
        self.modalities = list(modalities)
        kept: dict[str, dict[str, bool]] = {}
        wanted = set(sample_ids.tolist())
        for path in sorted((clean_dir / SAMPLES_DIR).glob("part-*.parquet")):
            for table in iter_row_groups(path, ["sample_id", *(f"{m}_available" for m in modalities)]):
                for row in table.to_pylist():
                    if row["sample_id"] in wanted:
                        kept[row["sample_id"]] = {m: row[f"{m}_available"] for m in modalities}
        where: dict[str, tuple[str, int, int]] = {}
        for path in sorted(raw_dir.glob("part-*.parquet")):
            for group, table in enumerate(iter_row_groups(path, ["sample_id"])):
                for row, sid in enumerate(table.column("sample_id").to_pylist()):
                    if sid in wanted and sid not in where:
                        where[sid] = (str(path), group, row)
        missing = wanted - set(where)
        if missing:
            raise PipelineError(f"{raw_dir}: test sample {sorted(missing)[0]} not found in the raw data (re-run collect)")
        self._where = [where[sid] for sid in sample_ids]
        self._kept = [kept[sid] for sid in sample_ids]
        self._cached: tuple[tuple[str, int], pa.Table] | None = None

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> dict:
        path, group, row = self._where[i]
        if self._cached is None or self._cached[0] != (path, group):
            self._cached = ((path, group), pq.ParquetFile(path).read_row_group(group, columns=self.modalities))
        values = self._cached[1].slice(row, 1).to_pylist()[0]
        return {m: values[m] if self._kept[i][m] else None for m in self.modalities}


def raw_test_items(raw_dir: Path, clean_dir: Path, sample_ids: np.ndarray, modalities: list[str]) -> RawItems:
    """For each sample id: the raw bytes of each modality that clean kept (None where it did not)."""
    return RawItems(raw_dir, clean_dir, sample_ids, modalities)


def predictor_accuracy(predictor, items: Sequence[dict], test: FeatureSet, batch_size: int,
                       target=None, answers: list | None = None) -> tuple[float, list[str]]:
    """A bundle predictor's headline metric (``target``'s; None: the test split's) on the raw test ``items``
    (a row it cannot read counts as a miss), and its errors as ``<sample id>: <reason>``. ``answers``: a
    list to append the predictor's answers to."""
    results = list(predictor.predict_rows(items, batch_size))
    if answers is not None:
        answers.extend(results)
    errors = [f"{sid}: {r['error']}" for sid, r in zip(test.sample_ids, results) if "error" in r]
    return (target or test.target).score_answers(results, test.labels), errors


def _bundle_accuracy(folder: Path, features_root: Path, raw_dir: Path, clean_dir: Path,
                     batch_size: int) -> tuple[float | None, int, str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    test = FeatureSet(features_root, split="test")
    theirs = manifest.get("target") or {"type": "category", "column": "label"}
    ours = test.target.spec
    if (theirs["type"], theirs.get("column", "label")) != (ours["type"], ours.get("column", "label")):
        return None, len(test), (f"it predicts a {theirs['type']} from column {theirs.get('column', 'label')!r}, "
                                 f"today's data a {ours['type']} from {ours.get('column', 'label')!r}")
    if ours["type"] == "number" and theirs.get("state", {}).get("transform") != test.target.transform:
        return None, len(test), "its target transform is not today's"
    unknown = sorted(set(test.label_names) - set(manifest["labels"]))
    if unknown and ours["type"] == "category":
        return None, len(test), f"it does not predict the classes {', '.join(unknown[:5])}"
    modalities = [m for m in manifest["modalities"] if m in MODALITIES]
    items = raw_test_items(raw_dir, clean_dir, test.sample_ids, modalities)
    # its own thresholds and tags (set): the bundle is scored as it would answer
    target = test.target.fitted({**test.target.state, **theirs.get("state", {})}) if ours["type"] == "set" else test.target
    accuracy, _ = predictor_accuracy(load_predictor(folder).Predictor(folder), items, test, batch_size, target)
    return accuracy, len(test), "scored on the raw test files"


def bundle_accuracy(folder: Path, features_root: Path, raw_dir: Path, clean_dir: Path,
                    batch_size: int = 64) -> tuple[float | None, int, str]:
    """Any bundle (another version's, e.g. the registry's champion) on today's raw test files:
    (its headline metric, or None when it cannot be compared: another target or classes; test items; why). In a fresh process: a bundle's
    predictor imports its own helper modules by their plain names, which another bundle in this
    process would already have taken."""
    import concurrent.futures as cf
    import multiprocessing

    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bundle_accuracy, Path(folder), Path(features_root), Path(raw_dir), Path(clean_dir),
                           batch_size).result()


def verify(folder: Path, model: torch.nn.Module, test: FeatureSet, items: Sequence[dict], parity_samples: int,
           quantized_from: Path | None = None, batch_size: int = 64) -> dict[str, Any]:
    """Check the bundle in ``folder`` against the PyTorch ``model`` on the ``test`` split, whose raw
    inputs are ``items`` (raw_test_items). ``quantized_from``: the fp32 ONNX model the shipped int8
    one was quantized from (None: not int8)."""
    modalities, target = model.modalities, model.target
    headline = target.HEADLINE
    batch = test.get(np.arange(min(parity_samples, len(test))))
    with torch.no_grad():
        torch_logits = model(to_model_inputs(batch, modalities, torch.device("cpu"))).numpy()
    fp32 = session(folder / "model_fp32.onnx")
    onnx_logits = run_logits(fp32, onnx_feeds(batch, model))
    everything = onnx_feeds(test.get(np.arange(len(test))), model)
    fp32_out = run_logits(fp32, everything)
    shipped_out = run_logits(session(folder / "model.onnx"), everything)
    base_out = run_logits(session(quantized_from), everything) if quantized_from else None
    fp16_path = folder / "model_fp16.onnx"  # the GPU model: its parity with fp32 on the CPU provider
    fp16_out = run_logits(session(fp16_path), everything) if fp16_path.exists() else None

    predict = load_predictor(folder)
    accuracy, errors, answers, shipped_answers = {}, [], [], []
    for which in ("shipped", "fp32"):
        accuracy[which], failed = predictor_accuracy(predict.Predictor(folder, model=which), items, test, batch_size,
                                                     target, answers if which == "fp32" else shipped_answers)
        errors += failed
    # row by row: the predictor's fp32 answer on the raw file vs the pipeline's (fp32 ONNX on the features)
    pipeline = target.scores(torch.from_numpy(fp32_out)).numpy()
    agree = [target.agree(a, target.answer(row)) for a, row in zip(answers, pipeline)]
    # (the "top1" names are the classes'; for a number or a tag set, the agreement of ``target.agree``)
    return {"parity_samples": len(batch["label"]), "headline": headline,
            "fp32_onnx_vs_pytorch_max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
            "shipped_vs_fp32_top1_agreement": float(target.agreement(fp32_out, shipped_out, True).mean()),
            "int8_vs_its_fp32_top1_agreement": (float(target.agreement(base_out, shipped_out, True).mean())
                                                if quantized_from else None),
            "fp16_vs_fp32_max_abs_logit_diff": float(np.abs(fp16_out - fp32_out).max()) if fp16_out is not None else None,
            "fp16_vs_fp32_top1_agreement": (float(target.agreement(fp32_out, fp16_out, True).mean())
                                            if fp16_out is not None else None),
            f"predictor_raw_test_{headline}": accuracy["shipped"],
            f"predictor_raw_test_{headline}_fp32": accuracy["fp32"],
            "predictor_vs_pipeline_agreement_fp32": float(np.mean(agree)),
            "predictor_input_errors": sorted(set(errors))} | trust_checks(folder, target, test, shipped_out, shipped_answers)


def trust_checks(folder: Path, target, test: FeatureSet, shipped_out: np.ndarray, answers: list[dict]) -> dict[str, Any]:
    """The shipped model's conformal sets on the test split: their coverage as the predictor gives them on the raw
    files (a row it could not read: not covered), and row by row whether they are the sets the pipeline computes
    from the same model on its own features (mmpipe/trust/calibration.py)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    fitted = manifest["models"]["shipped"].get("calibration")
    if not fitted:
        return {}
    modalities = manifest["modalities"]
    batch = test.get(np.arange(len(test)))
    patterns = calibration.pattern_keys(available_matrix(batch, modalities), modalities)
    _, sets = calibration.apply(target, fitted, shipped_out, patterns)
    ours = [target.set_answer(row) for row in sets]
    theirs = [a.get("interval", a.get("prediction_set")) for a in answers]
    return {"alpha": fitted["alpha"],
            "predictor_raw_test_coverage": float(np.mean([target.covered_by(a, y) for a, y in zip(answers, test.labels)])),
            "pipeline_test_coverage": float(target.covers(sets, test.labels).mean()),
            "predictor_vs_pipeline_set_agreement": float(np.mean([target.same_set(a, b) for a, b in zip(ours, theirs)]))}


def conversion_parity(folder: Path, predictor, features_root: Path, dataset: dict, model: torch.nn.Module,
                      test: FeatureSet, items: Sequence[dict], chunk: int = 256) -> dict[str, dict[str, Any]]:
    """For each modality with ``PARITY_VARIANTS`` and each variant: the raw test items re-encoded, then
    featurised by the pipeline (clean's conversion, preprocess's featurizer) and by the bundle's
    predictor; the share of items on which the fp32 model (other modalities' inputs unchanged) gives
    the same top-1, and the largest difference of the model's inputs. ``predictor``: the bundle's, with
    its fp32 model. ``chunk`` items at a time (re-encoded long recordings are large)."""
    fp32 = session(folder / "model_fp32.onnx")
    out: dict[str, dict[str, Any]] = {}
    for column, m in enumerate(model.modalities):
        module = MODALITIES[m]
        if not module.PARITY_VARIANTS:
            continue
        positions = np.array([i for i, item in enumerate(items) if item.get(m) is not None], np.int64)
        if not len(positions):
            continue
        rules = module.RULES(**dataset["clean_rules"][m])
        state = json.loads((features_root / m / STATE_FILE).read_text())
        featurizer = module.Features.from_state(features_root / m, state)
        arrays = array_names(state)
        tally = {variant: {"items": 0, "accepted_by_both": 0, "agree": 0, "diff": 0.0} for variant in module.PARITY_VARIANTS}
        for start in range(0, len(positions), chunk):
            part = positions[start:start + chunk]
            feeds = onnx_feeds(test.get(part), model)
            raw = [items[i][m] for i in part]
            for variant, encode in module.PARITY_VARIANTS.items():
                counts = _parity_counts(m, module, rules, featurizer, predictor, fp32, feeds, column, arrays,
                                        [encode(item) for item in raw], [str(test.sample_ids[i]) for i in part],
                                        model.target)
                t = tally[variant]
                t["items"] += len(part)
                t["accepted_by_both"] += counts["both"]
                t["agree"] += counts["agree"]
                t["diff"] = max(t["diff"], counts["diff"])
        out[m] = {variant: {"items": t["items"], "accepted_by_both": t["accepted_by_both"],
                            "top1_agreement": t["agree"] / t["items"], "max_abs_input_diff": t["diff"]}
                  for variant, t in tally.items()}
    return out


def _parity_counts(m: str, module, rules, featurizer, predictor, fp32, feeds: dict, column: int, arrays: list[str],
                   converted: list[bytes], ids: list[str], target) -> dict[str, Any]:
    """One chunk of ``conversion_parity``: items accepted by both paths, top-1 agreements, largest input difference."""
    cleaned = []
    for item in converted:
        try:
            cleaned.append(module.clean(item, rules).data)
        except RejectedInput:
            cleaned.append(None)
    undecodable: dict[int, str] = {}
    pipeline = featurizer.transform(cleaned, ids, errors=undecodable)
    pipeline_ok = np.array([c is not None and k not in undecodable for k, c in enumerate(cleaned)])
    served = {name: np.zeros_like(values) for name, values in pipeline.items()}
    served_ok = np.zeros(len(converted), bool)
    for k, item in enumerate(converted):
        try:
            arrays_k = predictor.features(**{m: item})
        except predictor.InputError:
            continue
        for name in arrays:
            served[name][k] = arrays_k[name]
        served_ok[k] = True
    both = pipeline_ok & served_ok
    outputs = []
    for values in (pipeline, served):
        available = feeds["available"].copy()
        available[:, column] &= both
        given = {name: values[name].astype(feeds[name].dtype) for name in arrays}
        outputs.append(run_logits(fp32, feeds | given | {"available": available}))
    agree = target.agreement(*outputs) & (pipeline_ok == served_ok)
    diff = max((float(np.abs(pipeline[n][both].astype(np.float64) - served[n][both]).max(initial=0.0))
                for n in arrays), default=0.0)
    return {"both": int(both.sum()), "agree": int(agree.sum()), "diff": diff}


def failed_checks(checks: dict, params) -> list[str]:
    failed = []
    if checks["fp32_onnx_vs_pytorch_max_abs_logit_diff"] > params.max_abs_logit_diff:
        failed.append(f"export check failed: fp32 ONNX differs from PyTorch by {checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.2e} "
                      f"(> export.max_abs_logit_diff {params.max_abs_logit_diff})")
    for m, variants in checks["conversion_parity"].items():
        for variant, parity in variants.items():
            if parity["top1_agreement"] < params.min_conversion_agreement:
                failed.append(f"export check failed: {m} as {variant}: the predictor and the pipeline agree on "
                              f"{parity['top1_agreement']:.4f} of test items (< export.min_conversion_agreement "
                              f"{params.min_conversion_agreement})")
    embed = checks.get("embed", {})
    if embed.get("shipped") and embed["onnx_vs_pytorch_max_abs_diff"] > params.max_abs_logit_diff:
        failed.append(f"export check failed: embed.onnx differs from the aligned PyTorch encoders by "
                      f"{embed['onnx_vs_pytorch_max_abs_diff']:.2e} (> export.max_abs_logit_diff {params.max_abs_logit_diff})")
    headline = checks.get("headline", "accuracy")
    agreement = checks.get("predictor_vs_pipeline_agreement_fp32", 1.0)
    if agreement < params.min_conversion_agreement:
        failed.append(f"export check failed: the predictor on the raw test files and the pipeline on their features "
                      f"agree on {agreement:.4f} of them (fp32; < export.min_conversion_agreement "
                      f"{params.min_conversion_agreement})")
    if abs(checks["predictor_gap_vs_evaluate"]) > params.max_predictor_accuracy_gap:
        failed.append(f"export check failed: the predictor on raw test files scores {headline} "
                      f"{checks[f'predictor_raw_test_{headline}_fp32']:.4f} with the fp32 model vs "
                      f"{checks[f'evaluate_test_{headline}']:.4f} in evaluate (> export.max_predictor_accuracy_gap "
                      f"{params.max_predictor_accuracy_gap})")
    return failed
