"""Metrics of predictions against targets on one split: scikit-learn's, plus the expected calibration
error (scikit-learn has the reliability curve but not the ECE summary of it) and the regression figures
scikit-learn lacks (median absolute percentage error)."""

from __future__ import annotations

import numpy as np

# scikit-learn is imported in the functions that use it: clean imports the targets, never these metrics


def _reliability(confidence: np.ndarray, outcome: np.ndarray, bins: int, name: str) -> tuple[float, list[dict]]:
    """ECE over ``bins`` equal-width bins of ``confidence``: the mean |observed rate of ``outcome`` - mean
    confidence| weighted by the bin's share; and the reliability table (the rate named ``name``)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        gap = abs(outcome[in_bin].mean() - confidence[in_bin].mean())
        ece += gap * in_bin.mean()
        table.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                      "confidence": float(confidence[in_bin].mean()), name: float(outcome[in_bin].mean()),
                      "samples": int(in_bin.sum())})
    return float(ece), table


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-1 confidence (is the predicted class right?), and the table."""
    return _reliability(probs.max(axis=1), probs.argmax(axis=1) == labels, bins, "accuracy")


def classification(probs: np.ndarray, labels: np.ndarray, label_names: list[str], ece_bins: int) -> dict:
    """Accuracy, macro/weighted precision/recall/F1, ECE, per-class table, confusion matrix, reliability."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

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


def binary_calibration(probs: np.ndarray, truth: np.ndarray, bins: int) -> tuple[float, list[dict]]:
    """Reliability of probabilities of a yes/no event (one tag, or all tags pooled): per bin of predicted
    probability, the observed frequency of the event."""
    return _reliability(probs.ravel(), truth.ravel().astype(bool), bins, "frequency")


def regression(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """MAE, RMSE, R² (scikit-learn) and the median absolute percentage error (rows whose true value is 0
    have no percentage: left out, counted)."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
    nonzero = truth != 0
    return {"samples": int(len(truth)), "mae": float(mean_absolute_error(truth, predicted)),
            "rmse": float(np.sqrt(mean_squared_error(truth, predicted))),
            "r2": float(r2_score(truth, predicted)) if len(truth) > 1 else 0.0,
            "median_ape": (float(np.median(np.abs(predicted[nonzero] - truth[nonzero]) / np.abs(truth[nonzero])))
                           if nonzero.any() else None),
            "zero_targets": int((~nonzero).sum())}


def multilabel(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, tags: list[str], bins: int) -> dict:
    """Micro/macro F1, precision and recall at the tags' thresholds, mean average precision (over the tags
    this split has positives of), subset accuracy (the whole set right), per-tag table, pooled and per-tag
    calibration."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    truth = truth.astype(bool)
    predicted = probs >= thresholds[None, :]
    summary = {"samples": int(len(truth)), "subset_accuracy": float((predicted == truth).all(axis=1).mean())}
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        summary |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    with_positives = truth.any(axis=0)
    summary["map"] = (float(average_precision_score(truth[:, with_positives], probs[:, with_positives], average="macro"))
                      if with_positives.any() else None)
    summary["ece"], reliability = binary_calibration(probs, truth, bins)
    p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    per_tag = {}
    for i, tag in enumerate(tags):
        ece, _ = binary_calibration(probs[:, i], truth[:, i], bins)
        per_tag[tag] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i]),
                        "threshold": float(thresholds[i]), "ece": ece}
    return {"summary": summary, "per_tag": per_tag, "reliability": reliability, "predicted": predicted}
