"""Evaluation of the trained models on one split (the test split for the evaluate stage).

Everything is computed from the models' predicted probabilities on whole-split tensors:
classification metrics, accuracy for every subset of available modalities, the robustness sweep
(each corruption of each modality at each noise level, applied to the decoded signal and pushed
through the same fitted featurizer as preprocess used), the gain of fusion over the single-modality
baselines, and inference latency.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe.data.clean import SAMPLES_DIR
from mmpipe.device import resolve_device
from mmpipe.errors import PipelineError
from mmpipe.evaluate.metrics import area_under, classification
from mmpipe.features.loader import FeatureSet, available_key
from mmpipe.features.preprocess import STATE_FILE
from mmpipe.io import iter_row_groups
from mmpipe.modalities import MODALITIES
from mmpipe.timing import latency_ms
from mmpipe.models.model_io import CONFIG_FILE, load_model, to_model_inputs


class SplitInputs:
    """One split's model inputs as whole tensors, and the same inputs with one modality corrupted."""

    def __init__(self, features_root: Path, clean_dir: Path, split: str = "test"):
        data = FeatureSet(features_root, split=split)
        if len(data) == 0:
            raise PipelineError(f"{features_root}: the {split} split is empty")
        self.features_root, self.clean_dir, self.split = Path(features_root), Path(clean_dir), split
        self.sample_ids, self.labels, self.label_names = data.sample_ids, data.labels, data.label_names
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
        module = MODALITIES[modality]
        if modality not in self._featurizers:
            folder = self.features_root / modality
            self._featurizers[modality] = module.Features.from_state(folder, json.loads((folder / STATE_FILE).read_text()))
        noise = module.CORRUPTIONS[corruption]
        errors: dict[int, str] = {}  # items that do not decode: unavailable, as preprocess made them
        arrays = self._featurizers[modality].transform(self.raw(modality), [str(s) for s in self.sample_ids],
                                                       noise=lambda x: noise(x, level, rng), errors=errors)
        tensors = self.tensors | {name: torch.from_numpy(values) for name, values in arrays.items()}
        if errors:
            key = available_key(modality)
            tensors[key] = tensors[key].clone()
            tensors[key][list(errors)] = False
        return tensors


@torch.no_grad()
def predict(model: torch.nn.Module, tensors: dict, device: torch.device, batch_size: int = 512) -> np.ndarray:
    """Class probabilities (n, n_classes) of ``model`` on whole-split ``tensors``."""
    model.eval()
    n, out = len(tensors["label"]), []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in tensors.items()}
        inputs = to_model_inputs(batch, model.modalities, device)
        out.append(torch.softmax(model(inputs).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


def accuracy_of(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


def subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    """The 2^n - 1 non-empty subsets, smallest first, in registry order (a, b, c, a+b, ...)."""
    return [c for k in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, k)]


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
             progress=print) -> dict[str, Any]:
    """All metrics of the evaluate stage. Returns ``{"metrics": ..., "tables": ...}``: stable-keyed
    metrics (metrics/eval.json) and the tables behind the plots and the report."""
    device = torch.device(resolve_device(params.device, "evaluate.device"))
    torch.manual_seed(params.seed)
    data = SplitInputs(features_root, clean_dir, split)
    if not (models_dir / "fusion" / CONFIG_FILE).exists():
        raise PipelineError(f"{models_dir / 'fusion'}: no trained fusion model (run the train stage)")
    fused = load_model(models_dir / "fusion").to(device)
    baselines = {m: load_model(models_dir / f"baseline_{m}").to(device) for m in fused.modalities
                 if (models_dir / f"baseline_{m}" / CONFIG_FILE).exists()}
    labels = data.labels

    # headline metrics of the fused model, and of each baseline
    probs = predict(fused, data.tensors, device)
    report = classification(probs, labels, data.label_names, params.ece_bins)
    metrics: dict[str, Any] = {"split": split, "modalities": list(fused.modalities), "test": report["summary"],
                               "per_class": report["per_class"]}
    metrics["baselines"] = {m: {"accuracy": accuracy_of(predict(model, data.tensors, device), labels)}
                            for m, model in baselines.items()}
    best = max(metrics["baselines"], key=lambda m: metrics["baselines"][m]["accuracy"], default=None)
    metrics["fusion_gain"] = None if best is None else report["summary"]["accuracy"] - metrics["baselines"][best]["accuracy"]
    metrics["best_baseline"] = best
    progress(f"evaluate: accuracy {report['summary']['accuracy']:.4f}, macro F1 {report['summary']['f1_macro']:.4f}"
             + (f", fusion gain {metrics['fusion_gain']:+.4f} over {best}" if best else ""))

    # missing modalities: the fused model with only a subset available (where the sample has it)
    metrics["missing"], missing_rows = {}, []
    for subset in subsets(fused.modalities):
        masked = data.tensors | {available_key(m): torch.zeros_like(data.tensors[available_key(m)])
                                 for m in fused.modalities if m not in subset}
        name = "+".join(subset)
        metrics["missing"][name] = {"accuracy": accuracy_of(predict(fused, masked, device), labels)}
        missing_rows.append({"modalities": name, "accuracy": metrics["missing"][name]["accuracy"]})

    # robustness: one modality corrupted at a time, same corrupted inputs for the fused model and its baseline
    levels = [float(x) for x in params.noise_levels]
    metrics["robustness"], curves = {}, {}
    for mi, modality in enumerate(fused.modalities):
        per_corruption, rows = {}, [{"level": level} for level in levels]
        for ci, corruption in enumerate(MODALITIES[modality].CORRUPTIONS):
            fused_acc, base_acc = [], []
            for li, level in enumerate(levels):
                rng = np.random.default_rng([params.seed, mi, ci, li])
                tensors = data.corrupted(modality, corruption, level, rng)
                fused_acc.append(accuracy_of(predict(fused, tensors, device), labels))
                rows[li][f"fused_{corruption}"] = fused_acc[-1]
                if modality in baselines:
                    base_acc.append(accuracy_of(predict(baselines[modality], tensors, device), labels))
                    rows[li][f"baseline_{corruption}"] = base_acc[-1]
            per_corruption[corruption] = {"relative": area_under(levels, fused_acc),
                                          "baseline_relative": area_under(levels, base_acc) if base_acc else None}
        metrics["robustness"][modality] = {
            "relative": float(np.mean([c["relative"] for c in per_corruption.values()])),
            "baseline_relative": (float(np.mean([c["baseline_relative"] for c in per_corruption.values()]))
                                  if modality in baselines else None),
            **per_corruption}
        curves[modality] = rows
        r = metrics["robustness"][modality]
        progress(f"evaluate: {modality} relative robustness {r['relative']:.4f} (fused)"
                 + (f" vs {r['baseline_relative']:.4f} (baseline)" if r["baseline_relative"] is not None else ""))

    # efficiency
    metrics["efficiency"] = {
        "parameters": sum(p.numel() for p in fused.parameters()), "device": device.type,
        "threads": torch.get_num_threads(),
        "latency_ms": {f"batch_{b}": forward_latency_ms(fused, data.tensors, b, params.latency_runs, device)
                       for b in (1, 64)}}

    tables = {"confusion": report["confusion"], "predicted": report["predicted"], "labels": labels,
              "label_names": data.label_names, "reliability": report["reliability"], "missing": missing_rows,
              "robustness": curves, "levels": levels}
    return {"metrics": metrics, "tables": tables}


def failed_gates(metrics: dict, gates) -> list[str]:
    """One line per quality gate that ``metrics`` do not meet (empty: all pass)."""
    failed = []
    checks = [("min_accuracy", "test accuracy", metrics["test"]["accuracy"]),
              ("min_f1_macro", "test macro F1", metrics["test"]["f1_macro"]),
              ("min_fusion_gain", "fusion gain over the best baseline", metrics["fusion_gain"])]
    for key, what, value in checks:
        bar = getattr(gates, key)
        if bar is None:
            continue
        if value is None:
            failed.append(f"quality gate evaluate.gates.{key}: no {what} to check (train.baselines is false)")
        elif value < bar:
            failed.append(f"quality gate evaluate.gates.{key} failed: {what} is {value:.4f}, below {bar}")
    return failed
