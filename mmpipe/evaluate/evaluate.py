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

from mmpipe.device import resolve_device
from mmpipe.errors import PipelineError
from mmpipe.evaluate.metrics import area_under, classification
from mmpipe.features.loader import FeatureSet
from mmpipe.io import iter_row_groups
from mmpipe.modalities import MODALITIES
from mmpipe.names import SAMPLES_DIR, STATE_FILE, available_key
from mmpipe.timing import latency_ms
from mmpipe.training.model_io import CONFIG_FILE, load_model, to_model_inputs


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
    progress(f"evaluate: accuracy {report['summary']['accuracy']:.4f}, macro F1 {report['summary']['f1_macro']:.4f}"
             + (f", fusion gain {metrics['fusion_gain']:+.4f} over {metrics['best_baseline']}"
                if metrics["best_baseline"] else ""))
    metrics["missing"] = missing_modalities(fused, data, device)
    levels = [float(x) for x in params.noise_levels]
    metrics["robustness"], curves = robustness(fused, baselines, data, device, levels, params.seed, progress)
    metrics["efficiency"] = efficiency(fused, data, device, params.latency_runs)

    tables = {"confusion": report["confusion"], "predicted": report["predicted"], "labels": data.labels,
              "label_names": data.label_names, "reliability": report["reliability"],
              "missing": [{"modalities": name, "accuracy": m["accuracy"]} for name, m in metrics["missing"].items()],
              "robustness": curves, "levels": levels}
    return {"metrics": metrics, "tables": tables}


def load_models(models_dir: Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The fused model and the single-modality baselines that were trained (train.baselines)."""
    if not (models_dir / "fusion" / CONFIG_FILE).exists():
        raise PipelineError(f"{models_dir / 'fusion'}: no trained fusion model (run the train stage)")
    fused = load_model(models_dir / "fusion").to(device)
    baselines = {m: load_model(models_dir / f"baseline_{m}").to(device) for m in fused.modalities
                 if (models_dir / f"baseline_{m}" / CONFIG_FILE).exists()}
    return fused, baselines


def model_scores(fused, baselines: dict, data: SplitInputs, device: torch.device, ece_bins: int) -> tuple[dict, dict]:
    """Classification metrics of the fused model, each baseline's accuracy, and the gain of fusion over
    the best baseline (None without baselines). Returns (metrics, the full classification report)."""
    report = classification(predict(fused, data.tensors, device), data.labels, data.label_names, ece_bins)
    scores = {m: {"accuracy": accuracy_of(predict(model, data.tensors, device), data.labels)}
              for m, model in baselines.items()}
    best = max(scores, key=lambda m: scores[m]["accuracy"], default=None)
    gain = None if best is None else report["summary"]["accuracy"] - scores[best]["accuracy"]
    return {"modalities": list(fused.modalities), "test": report["summary"], "per_class": report["per_class"],
            "baselines": scores, "fusion_gain": gain, "best_baseline": best}, report


def missing_modalities(fused, data: SplitInputs, device: torch.device) -> dict[str, dict]:
    """Accuracy of the fused model with only each subset of modalities available (where the sample has it)."""
    out = {}
    for subset in subsets(fused.modalities):
        masked = data.tensors | {available_key(m): torch.zeros_like(data.tensors[available_key(m)])
                                 for m in fused.modalities if m not in subset}
        out["+".join(subset)] = {"accuracy": accuracy_of(predict(fused, masked, device), data.labels)}
    return out


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
                fused_acc.append(accuracy_of(predict(fused, tensors, device), data.labels))
                rows[li][f"fused_{corruption}"] = fused_acc[-1]
                if modality in baselines:
                    base_acc.append(accuracy_of(predict(baselines[modality], tensors, device), data.labels))
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
