"""Evaluation of the trained models on one split (the test split for the evaluate stage).

Everything is computed from the models' scores (their target's ``scores``: class probabilities, values
in the user's units, per-tag probabilities) on whole-split tensors: the target's metrics, its headline
metric (accuracy, R², micro-F1) for every subset of available modalities, the robustness sweep (each
corruption of each modality at each noise level, applied to the decoded signal and pushed through the same
fitted featurizer as preprocess used), the gain of fusion over the single-modality baselines, and
inference latency. Rows without a target are not in the split (the loader leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe.device import resolve_device
from mmpipe.errors import PipelineError
from mmpipe.evaluate.metrics import area_under
from mmpipe.features.loader import FeatureSet
from mmpipe.io import iter_row_groups
from mmpipe.modalities import MODALITIES
from mmpipe.pretrain.align import split_retrieval
from mmpipe.names import SAMPLES_DIR, STATE_FILE, available_key
from mmpipe.timing import latency_ms
from mmpipe.training.model_io import CONFIG_FILE, load_model, subset_outputs, to_model_inputs
from mmpipe.trust import attribution, calibration


class SplitInputs:
    """One split's model inputs as whole tensors, and the same inputs with one modality corrupted."""

    def __init__(self, features_root: Path, clean_dir: Path, split: str = "test"):
        data = FeatureSet(features_root, split=split)
        if len(data) == 0:
            raise PipelineError(f"{features_root}: the {split} split is empty")
        self.features_root, self.clean_dir, self.split = Path(features_root), Path(clean_dir), split
        self.sample_ids, self.labels, self.label_names = data.sample_ids, data.labels, data.label_names
        self.target = data.target
        self.tensors = data.get(np.arange(len(data)))
        self.tensors.pop("index")
        self._raw: dict[str, list] = {}
        self._featurizers: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, modality: str) -> list:
        """The clean content of ``modality`` for this split, in loader order (None where unavailable)."""
        if modality not in self._raw:
            by_id = {}
            columns = ["sample_id", "split", modality, f"{modality}_available"]
            for path in sorted((self.clean_dir / SAMPLES_DIR).glob("part-*.parquet")):
                for table in iter_row_groups(path, columns):
                    part = table.to_pydict()
                    for sid, split, value, ok in zip(*(part[c] for c in columns)):
                        if split == self.split:
                            by_id[sid] = value if ok else None
            missing = [sid for sid in self.sample_ids if sid not in by_id]
            if missing:
                raise PipelineError(f"{self.clean_dir}: sample {missing[0]} of the features is not in the clean data "
                                    f"(re-run the preprocess stages)")
            self._raw[modality] = [by_id[sid] for sid in self.sample_ids]
        return self._raw[modality]

    def corrupted(self, modality: str, corruption: str, level: float, rng: np.random.Generator) -> dict:
        """The split's tensors with ``modality`` recomputed from its clean content under ``corruption``."""
        noise = MODALITIES[modality].CORRUPTIONS[corruption]
        return self.transformed(modality, lambda x: noise(x, level, rng))

    def transformed(self, modality: str, change) -> dict:
        """The split's tensors with ``modality`` recomputed from its clean content, ``change`` applied to its
        decoded signal (a corruption; bench/drift.py: a distribution shift)."""
        module = MODALITIES[modality]
        if modality not in self._featurizers:
            folder = self.features_root / modality
            self._featurizers[modality] = module.Features.from_state(folder, json.loads((folder / STATE_FILE).read_text()))
        errors: dict[int, str] = {}  # items that do not decode: unavailable, as preprocess made them
        arrays = self._featurizers[modality].transform(self.raw(modality), [str(s) for s in self.sample_ids],
                                                       noise=change, errors=errors)
        tensors = self.tensors | {name: torch.from_numpy(values) for name, values in arrays.items()}
        if errors:
            key = available_key(modality)
            tensors[key] = tensors[key].clone()
            tensors[key][list(errors)] = False
        return tensors


@torch.no_grad()
def predict(model: torch.nn.Module, tensors: dict, device: torch.device, batch_size: int | None = None) -> np.ndarray:
    """The scores of ``model`` (its target's: class probabilities (n, K), values (n,), tag probabilities
    (n, K)) on whole-split ``tensors``. Batches of 512 rows on CPU, 8192 on CUDA (the corruption sweeps call
    this hundreds of times: on a GPU a few large launches beat many small ones)."""
    batch_size = batch_size or (8192 if device.type == "cuda" else 512)
    model.eval()
    n, out = len(tensors["label"]), []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in tensors.items()}
        inputs = to_model_inputs(batch, model.modalities, device)
        out.append(model.target.scores(model(inputs).float()).cpu().numpy())
    return np.concatenate(out)


def headline_of(model: torch.nn.Module, scores: np.ndarray, labels: np.ndarray) -> float:
    """The headline metric of ``model``'s target (accuracy, r2, f1_micro at its own thresholds)."""
    return model.target.headline(scores, labels)


def available_matrix(tensors: dict, modalities: list[str]) -> np.ndarray:
    """(n, len(modalities)) bool: which modality each row has."""
    return np.stack([tensors[available_key(m)].numpy().astype(bool) for m in modalities], axis=1)


@torch.no_grad()
def forward_latency_ms(model: torch.nn.Module, tensors: dict, batch_size: int, runs: int, device: torch.device) -> dict:
    """p50/p95 of one forward pass of ``model`` at ``batch_size`` (CUDA: synchronised, so the time is the GPU's)."""
    take = np.resize(np.arange(len(tensors["label"])), batch_size)
    inputs = to_model_inputs({k: v[take] for k, v in tensors.items()}, model.modalities, device)
    model.eval()

    def forward() -> None:
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return latency_ms(forward, runs)


def evaluate(params, features_root: Path, clean_dir: Path, models_dir: Path, split: str = "test",
             progress=print, aligned_dir: Path | None = None) -> dict[str, Any]:
    """All metrics of the evaluate stage. Returns ``{"metrics": ..., "tables": ...}``: stable-keyed
    metrics (metrics/eval.json) and the tables behind the plots and the report.

    Steps: load the split and the models -> headline metrics (fused model, baselines, fusion gain) ->
    missing modalities (every subset) -> robustness (every corruption of every modality) -> efficiency.
    """
    device = torch.device(resolve_device(params.device, "evaluate.device"))
    torch.manual_seed(params.seed)
    data = SplitInputs(features_root, clean_dir, split)
    fused, baselines = load_models(models_dir, device)

    metrics, report = model_scores(fused, baselines, data, device, params.ece_bins)
    metrics = {"split": split, **metrics}
    headline = fused.target.HEADLINE
    summary = report["summary"]
    progress(f"evaluate: {headline} {summary[headline]:.4f}"
             + (f", macro F1 {summary['f1_macro']:.4f}" if "f1_macro" in summary and headline != "f1_macro" else "")
             + (f", fusion gain {metrics['fusion_gain']:+.4f} over {metrics['best_baseline']}"
                if metrics["best_baseline"] else ""))
    outputs = subset_outputs(fused, data.tensors, device)
    metrics["missing"] = missing_modalities(fused, data, outputs)
    trust, trust_tables = how_far_to_trust(fused, data, SplitInputs(features_root, clean_dir, "val"), outputs,
                                           device, params.calibration, params.ece_bins)
    metrics |= trust
    progress(trust_line(metrics))
    levels = [float(x) for x in params.noise_levels]
    metrics["robustness"], curves = robustness(fused, baselines, data, device, levels, params.seed, progress)
    metrics["efficiency"] = efficiency(fused, data, device, params.latency_runs)
    if aligned_dir is not None:  # the pretrain stage's aligned embeddings: which recording matches this photo?
        metrics["retrieval"] = split_retrieval(aligned_dir, features_root, split, device)
        if metrics["retrieval"]["enabled"]:
            r = metrics["retrieval"]
            progress(f"evaluate: cross-modal retrieval on {r['rows']} {split} rows, mean over "
                     f"{len(r['pairs'])} modality pairs: recall@1 {r['mean_recall@1']:.3f}, "
                     f"recall@5 {r['mean_recall@5']:.3f}")

    tables = {key: report[key] for key in ("confusion", "predicted", "truth", "reliability", "per_tag") if key in report}
    tables |= {"target": fused.target.NAME, "headline": headline, "labels": data.labels,
               "label_names": data.label_names,
               "missing": [{"modalities": name, "metric": headline, "score": m[headline]}
                           for name, m in metrics["missing"].items()],
               "robustness": curves, "levels": levels, **trust_tables}
    return {"metrics": metrics, "tables": tables}


def load_models(models_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The fused model and the single-modality baselines that were trained (train.baselines)."""
    if not (models_dir / "fusion" / CONFIG_FILE).exists():
        raise PipelineError(f"{models_dir / 'fusion'}: no trained fusion model (run the train stage)")
    fused = load_model(models_dir / "fusion").to(device)  # (each model carries its own target: set thresholds)
    baselines = {m: load_model(models_dir / f"baseline_{m}").to(device) for m in fused.modalities
                 if (models_dir / f"baseline_{m}" / CONFIG_FILE).exists()}
    return fused, baselines


def model_scores(fused, baselines: dict, data: SplitInputs, device: torch.device, ece_bins: int) -> tuple[dict, dict]:
    """The target's metrics of the fused model, each baseline's headline metric, and the gain of fusion over
    the best baseline in that metric (None without baselines). Returns (metrics, the target's full report)."""
    target, headline = fused.target, fused.target.HEADLINE
    report = target.metrics(predict(fused, data.tensors, device), data.labels, ece_bins)
    scores = {m: {headline: headline_of(model, predict(model, data.tensors, device), data.labels)}
              for m, model in baselines.items()}
    best = max(scores, key=lambda m: scores[m][headline], default=None)
    gain = None if best is None else report["summary"][headline] - scores[best][headline]
    table = {key: report[key] for key in ("per_class", "per_tag") if key in report}
    about = {"type": target.NAME, "column": target.spec.get("column", "label"), "headline": headline,
             "chance": target.chance(data.labels)}
    if target.NAME == "number":
        about["transform"] = target.transform
    return {"modalities": list(fused.modalities), "target": about, "test": report["summary"], **table,
            "baselines": scores, "fusion_gain": gain, "best_baseline": best}, report


def scores_of(model: torch.nn.Module, outputs: np.ndarray) -> np.ndarray:
    return model.target.scores(torch.from_numpy(outputs)).numpy()


def missing_modalities(fused, data: SplitInputs, outputs: dict[tuple[str, ...], np.ndarray]) -> dict[str, dict]:
    """The headline metric of the fused model with only each subset of modalities available (where the
    sample has it): ``outputs``, from ``subset_outputs``."""
    return {"+".join(subset): {fused.target.HEADLINE: headline_of(fused, scores_of(fused, o), data.labels)}
            for subset, o in outputs.items() if subset}


def how_far_to_trust(fused, test: SplitInputs, val: SplitInputs, test_outputs: dict, device: torch.device, cfg,
                     ece_bins: int) -> tuple[dict, dict]:
    """Calibration and conformal sets fitted on ``val`` and assessed on ``test`` (per availability pattern), and
    the modalities' Shapley attribution from the test subsets (``test_outputs``: ``subset_outputs``). Returns
    (metrics: calibration, conformal, attribution; tables for the plots and the report)."""
    target, modalities = fused.target, list(fused.modalities)
    val_outputs = subset_outputs(fused, val.tensors, device)
    val_available = available_matrix(val.tensors, modalities)
    fitted = calibration.fit(target, modalities, calibration.rows_by_pattern(val_available, val_outputs, modalities),
                             val.labels, val_outputs[tuple(modalities)], cfg)
    test_available = available_matrix(test.tensors, modalities)
    assessed = calibration.assess(target, fitted, calibration.rows_by_pattern(test_available, test_outputs, modalities),
                                  test.labels, test_outputs[tuple(modalities)], test_available, ece_bins,
                                  cfg.min_pattern_rows)
    headline = {frozenset(s): headline_of(fused, scores_of(fused, o), test.labels) for s, o in test_outputs.items()}
    likelihood = {frozenset(s): -target.nll(o.astype(np.float64), test.labels) for s, o in test_outputs.items()}
    metrics = {"calibration": fitted, "conformal": {k: v for k, v in assessed.items() if k != "reliability"},
               "attribution": {target.HEADLINE: attribution.attribution(modalities, headline),
                               "log_likelihood": attribution.attribution(modalities, likelihood)}}
    tables = {"coverage": [{"pattern": p, "rows": r["rows"], "coverage": r["coverage"],
                            "coverage_single_threshold": r["coverage_single_threshold"],
                            "mean_size": r["mean_size"], "target": 1 - fitted["alpha"]}
                           for p, r in [("marginal", assessed["marginal"]), *assessed["patterns"].items()]],
              "attribution": [{"modality": m, "shapley": v, "share": (metrics["attribution"][target.HEADLINE]["share"]
                                                                        or {}).get(m)}
                              for m, v in metrics["attribution"][target.HEADLINE]["shapley"].items()]}
    if assessed.get("reliability"):
        tables["reliability_calibrated"] = assessed["reliability"]
    return metrics, tables


def trust_line(metrics: dict) -> str:
    """One progress line: ECE before -> after, marginal coverage and set size, the top modality's share."""
    marginal = metrics["conformal"]["marginal"]
    parts = []
    if "ece_calibrated" in marginal:
        parts.append(f"ECE {marginal['ece']:.4f} -> {marginal['ece_calibrated']:.4f} calibrated")
    size = marginal["mean_size"]
    parts.append(f"conformal coverage {marginal['coverage']:.3f} at alpha {metrics['conformal']['alpha']:g}"
                 + ("" if size is None else f" (mean set size {size:.3g})"))
    shares = next(iter(metrics["attribution"].values()))["share"]
    if shares:
        top = max(shares, key=shares.get)
        parts.append(f"{top} carries {100 * shares[top]:.0f} % of the Shapley attribution")
    return "evaluate: " + ", ".join(parts)


def robustness(fused, baselines: dict, data: SplitInputs, device: torch.device, levels: list[float], seed: int,
               progress=print) -> tuple[dict, dict]:
    """One modality corrupted at a time, at each level: the same corrupted inputs go to the fused model and
    that modality's baseline. Returns (area-under-curve metrics per modality and corruption, the curves)."""
    metrics, curves = {}, {}
    for mi, modality in enumerate(fused.modalities):
        per_corruption, rows = {}, [{"level": level} for level in levels]
        for ci, corruption in enumerate(MODALITIES[modality].CORRUPTIONS):
            fused_acc, base_acc = [], []
            for li, level in enumerate(levels):
                rng = np.random.default_rng([seed, mi, ci, li])
                tensors = data.corrupted(modality, corruption, level, rng)
                fused_acc.append(headline_of(fused, predict(fused, tensors, device), data.labels))
                rows[li][f"fused_{corruption}"] = fused_acc[-1]
                if modality in baselines:
                    base_acc.append(headline_of(baselines[modality], predict(baselines[modality], tensors, device),
                                                data.labels))
                    rows[li][f"baseline_{corruption}"] = base_acc[-1]
            per_corruption[corruption] = {"relative": area_under(levels, fused_acc),
                                          "baseline_relative": area_under(levels, base_acc) if base_acc else None}
        metrics[modality] = {
            "relative": float(np.mean([c["relative"] for c in per_corruption.values()])),
            "baseline_relative": (float(np.mean([c["baseline_relative"] for c in per_corruption.values()]))
                                  if modality in baselines else None),
            **per_corruption}
        curves[modality] = rows
        r = metrics[modality]
        progress(f"evaluate: {modality} relative robustness {r['relative']:.4f} (fused)"
                 + (f" vs {r['baseline_relative']:.4f} (baseline)" if r["baseline_relative"] is not None else ""))
    return metrics, curves


def efficiency(fused, data: SplitInputs, device: torch.device, runs: int) -> dict:
    """Parameters and forward latency (batch 1 and 64) of the fused model."""
    return {"parameters": sum(p.numel() for p in fused.parameters()), "device": device.type,
            "threads": torch.get_num_threads(),
            "latency_ms": {f"batch_{b}": forward_latency_ms(fused, data.tensors, b, runs, device) for b in (1, 64)}}


def failed_gates(metrics: dict, gates) -> tuple[list[str], dict[str, str]]:
    """(one line per quality gate that ``metrics`` do not meet, {gate: why} for the class gates that do not
    apply to this target: min_accuracy of a number, say). Both empty: every gate passes."""
    failed, skipped, test = [], {}, metrics["test"]
    headline = metrics.get("target", {}).get("headline", "accuracy")
    checks = [("min_accuracy", "test accuracy", "accuracy", test.get("accuracy"), min),
              ("min_f1_macro", "test macro F1", "f1_macro", test.get("f1_macro"), min),
              ("min_fusion_gain", "fusion gain over the best baseline" + ("" if headline == "accuracy" else f" ({headline})"),
               "fusion_gain",
               metrics["fusion_gain"], min)]
    checks += [(f"min.{name}", f"test {name}", name, test.get(name), min) for name in gates.min]
    checks += [(f"max.{name}", f"test {name}", name, test.get(name), max) for name in gates.max]
    failed += trust_gates(metrics, gates)
    for key, what, name, value, side in checks:
        bar = getattr(gates, key) if "." not in key else getattr(gates, key.split(".")[0])[name]
        if bar is None:
            continue
        if name != "fusion_gain" and name not in test:
            line = (f"evaluate.gates.{key}: this {metrics.get('target', {}).get('type', 'category')} target has no "
                    f"test {name} (its metrics: {', '.join(k for k in test if k != 'samples')})")
            if key in ("min_accuracy", "min_f1_macro"):  # the defaults of params.yaml: a category's bars
                skipped[key] = line
            else:
                failed.append(line)
        elif value is None:
            failed.append(f"quality gate evaluate.gates.{key}: no {what} to check (train.baselines is false)")
        elif side is min and value < bar:
            failed.append(f"quality gate evaluate.gates.{key} failed: {what} is {value:.4f}, below {bar}")
        elif side is max and value > bar:
            failed.append(f"quality gate evaluate.gates.{key} failed: {what} is {value:.4f}, above {bar}")
    return failed, skipped


def trust_gates(metrics: dict, gates) -> list[str]:
    """The gates on how far to trust the model: conformal coverage (marginal, and per availability pattern with
    enough test rows) and modality collapse (one modality's share of the headline's positive Shapley values)."""
    failed = []
    conformal = metrics.get("conformal")
    if gates.min_coverage is not None and conformal:
        enough = metrics["calibration"]["min_pattern_rows"]
        for name, row in [("marginally", conformal["marginal"]),
                          *((f"with only {p} available", r) for p, r in conformal["patterns"].items())]:
            if row["rows"] >= enough and row["coverage"] < gates.min_coverage:
                failed.append(f"quality gate evaluate.gates.min_coverage failed: the conformal sets at alpha "
                              f"{conformal['alpha']:g} hold the truth in {row['coverage']:.4f} of {row['rows']} test "
                              f"rows {name}, below {gates.min_coverage}")
    shares = (metrics.get("attribution") or {}).get(metrics.get("target", {}).get("headline", "accuracy"), {}).get("share")
    if gates.max_modality_share is not None and shares:
        top = max(shares, key=shares.get)
        if shares[top] > gates.max_modality_share:
            failed.append(f"quality gate evaluate.gates.max_modality_share failed: {top} carries {shares[top]:.1%} of "
                          f"the fused model's Shapley attribution (above {gates.max_modality_share:.0%}): the model "
                          f"leans on {top} and little on the others (modality collapse; reports/eval.md)")
    return failed
