"""Drift monitor: does a window of production rows still look like the training data, and if not, which
modality and which statistic moved? numpy only: shipped as is in the deployment bundle (predict.py --monitor).

Statistics, per row, named ``<modality>.<statistic>``: each modality's input class computes its own from the
arrays the model takes (``statistics``: image brightness, contrast and sharpness; audio loudness and the
spread between loud and quiet frames, an SNR proxy; text length and out-of-vocabulary rate; tabular, each
column), plus ``<modality>.available`` (is it there at all) and ``<modality>.model`` (what the model makes of
that modality alone: its confidence with only it available, i.e. the encoder's projected embedding as the
fused head reads it). A row without the modality has NaN there.

The reference (written at export from the train split): per statistic up to ``REFERENCE_POINTS`` evenly
spaced order statistics of its train values (a numeric one; a categorical one: its frequencies). A window's
distance to it is the Kolmogorov-Smirnov distance (numeric) or the total variation distance (categorical),
times sqrt(rows): under no drift its distribution hardly depends on the window size.

Thresholds are calibrated, not guessed: windows of ``window_rows`` rows are drawn (with replacement, from a
bootstrap resample of them) from held-out in-distribution rows (validation + test); each statistic's distance
is scaled by its own 95th
percentile over those windows, a window's score is its largest scaled distance, and the alarm threshold is
the (1 - false_alarm) quantile of the score over half of the windows; the other half measures the false-alarm
rate that is then stated (``false_alarm_measured``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

REFERENCE_POINTS = 1000  # order statistics kept per numeric statistic (the reference's ECDF)
MIN_ROWS = 20  # a statistic seen on fewer rows of a window is not judged in it
# the smallest scale of a statistic: one that never moved on held-out windows (a modality always present, a
# constant column) still alarms when ~1 % of a 500-row window changes it, rather than at any single row
SCALE_FLOOR = 0.25


def summarize(values: np.ndarray, kind: str) -> dict[str, Any]:
    """A statistic's reference from its train values (NaN: rows without the modality, left out)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if kind == "categorical":
        keys, counts = np.unique(values, return_counts=True)
        return {"kind": kind, "rows": int(len(values)),
                "frequencies": {f"{k:g}": float(c / max(len(values), 1)) for k, c in zip(keys, counts)}}
    points = np.quantile(values, (np.arange(REFERENCE_POINTS) + 0.5) / REFERENCE_POINTS) if len(values) else []
    return {"kind": "numeric", "rows": int(len(values)), "points": [float(x) for x in points]}


def distance(reference: dict[str, Any], values: np.ndarray) -> float:
    """KS distance between the window's values and the reference (numeric), or total variation (categorical)."""
    if reference["kind"] == "categorical":
        keys, counts = np.unique(values, return_counts=True)
        window = {f"{k:g}": c / len(values) for k, c in zip(keys, counts)}
        known = reference["frequencies"]
        return 0.5 * sum(abs(window.get(k, 0.0) - known.get(k, 0.0)) for k in set(window) | set(known))
    points = np.asarray(reference["points"])
    ordered = np.sort(values)
    at = np.concatenate([ordered, points])
    ours = np.searchsorted(ordered, at, side="right") / len(ordered)
    theirs = np.searchsorted(points, at, side="right") / len(points)
    return float(np.abs(ours - theirs).max())


def scaled_distances(references: dict[str, dict], stats: dict[str, np.ndarray]) -> dict[str, tuple[int, float]]:
    """{statistic: (rows judged, distance x sqrt(rows))} of one window; statistics on < MIN_ROWS rows left out."""
    out = {}
    for name, reference in references.items():
        values = np.asarray(stats.get(name, ()), np.float64)
        values = values[~np.isnan(values)]
        if len(values) >= MIN_ROWS and reference["rows"]:
            out[name] = (int(len(values)), distance(reference, values) * math.sqrt(len(values)))
    return out


def fit(train: dict[str, tuple[str, np.ndarray]], heldout: dict[str, np.ndarray], window_rows: int, windows: int,
        false_alarm: float, seed: int = 0) -> dict[str, Any]:
    """The reference of ``train`` ({statistic: (kind, per-row values)}) and the alarm threshold, calibrated on
    ``windows`` windows of ``window_rows`` rows drawn from the ``heldout`` rows ({statistic: per-row values})."""
    references = {name: summarize(values, kind) for name, (kind, values) in train.items()}
    n = len(next(iter(heldout.values())))
    # a window larger than the held-out rows would repeat them, and its distance (x sqrt(rows)) would measure the
    # held-out sample's own deviation, magnified: calibrate on windows of at most that many rows (the sqrt(rows)
    # scaling carries the threshold to other window sizes)
    size = min(window_rows, n)
    rng = np.random.default_rng(seed)
    names = list(references)
    table = np.full((windows, len(names)), np.nan)
    for w in range(windows):
        # the held-out rows resampled first, then the window from them: a window of production data differs from
        # the training data by its own sampling *and* by which rows the held-out sample happened to hold; a window
        # from the held-out rows alone would carry only the first, and the threshold would then be too tight
        pool = rng.integers(0, n, n)
        rows = pool[rng.integers(0, n, size)]
        judged = scaled_distances(references, {k: np.asarray(v)[rows] for k, v in heldout.items()})
        for j, name in enumerate(names):
            if name in judged:
                table[w, j] = judged[name][1]
    # a statistic never judged on a held-out window (too few held-out rows have it) is not monitored
    scale = {name: max(float(np.nanquantile(table[:, j], 0.95)), SCALE_FLOOR) for j, name in enumerate(names)
             if not np.isnan(table[:, j]).all()}
    out = {"format": 1, "window_rows": window_rows, "calibration_window_rows": size, "windows": windows,
           "false_alarm": false_alarm,
           "threshold": None, "false_alarm_measured": None, "heldout_rows": int(n), "scale": scale,
           "statistics": {k: references[k] for k in scale}}
    if scale:
        columns = [names.index(k) for k in scale]
        scores = np.nanmax(table[:, columns] / np.array([scale[k] for k in scale]), axis=1)
        half = windows // 2
        out["threshold"] = float(np.quantile(scores[:half], 1.0 - false_alarm))
        out["false_alarm_measured"] = float((scores[half:] > out["threshold"]).mean())
    return out


def score(reference: dict[str, Any], stats: dict[str, np.ndarray]) -> dict[str, Any]:
    """One window's verdict: each statistic's scaled distance, the largest (the modality and statistic named),
    and whether it passes the threshold."""
    judged = scaled_distances(reference["statistics"], stats)
    if reference["threshold"] is None:
        return {"drifted": False, "judged": False, "why": "the reference has no statistic to monitor"}
    if not judged:
        return {"drifted": False, "judged": False,
                "why": f"no statistic has {MIN_ROWS} or more rows in this window: too few to judge"}
    scores = {name: d / reference["scale"][name] for name, (_, d) in judged.items()}
    worst = max(scores, key=scores.get)
    drifted = scores[worst] > reference["threshold"]
    return {"drifted": bool(drifted), "judged": True, "score": round(scores[worst], 4),
            "threshold": round(reference["threshold"], 4), "modality": worst.split(".", 1)[0], "statistic": worst,
            "rows": max(n for n, _ in judged.values()),
            "statistics": {name: {"rows": judged[name][0], "score": round(s, 4)} for name, s in
                           sorted(scores.items(), key=lambda kv: -kv[1])}}
