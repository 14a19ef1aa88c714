"""Classification metrics on one split: scikit-learn's, plus expected calibration error
(scikit-learn has the reliability curve but not the ECE summary of it)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error over ``bins`` equal-width confidence bins, and the reliability table."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
        ece += gap * in_bin.mean()
        table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                      "confidence": float(confidence[in_bin].mean()), "accuracy": float(correct[in_bin].mean()),
                      "samples": int(in_bin.sum())})
    return float(ece), table


def classification(probs: np.ndarray, labels: np.ndarray, label_names: list[str], ece_bins: int) -> dict:
    """Accuracy, macro/weighted precision/recall/F1, ECE, per-class table, confusion matrix, reliability."""
    predicted = probs.argmax(axis=1)
    classes = list(range(len(label_names)))
    summary = {"samples": int(len(labels)), "accuracy": float(accuracy_score(labels, predicted))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=classes, average=average,
                                                     zero_division=0)
        summary |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    summary["ece"], reliability = calibration(probs, labels, ece_bins)
    p, r, f, support = precision_recall_fscore_support(labels, predicted, labels=classes, average=None,
                                                       zero_division=0)
    per_class = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                 for i, name in enumerate(label_names)}
    return {"summary": summary, "per_class": per_class, "reliability": reliability,
            "confusion": confusion_matrix(labels, predicted, labels=classes), "predicted": predicted}


def area_under(levels: list[float], accuracies: list[float]) -> float:
    """Relative robustness (MultiBench): area under accuracy-vs-noise-level, per unit of level range."""
    span = levels[-1] - levels[0]
    return float(np.trapezoid(accuracies, levels) / span) if span > 0 else float(accuracies[0])
