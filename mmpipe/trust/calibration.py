"""Calibrated confidence and split-conformal prediction sets, one of each per modality-availability pattern.

A *pattern* is the set of modalities a row has ("image+audio"): a row that arrives without its audio is
less certain than one with all of them, and one temperature or one threshold for all rows would promise
the complete rows' confidence to the incomplete ones (Mondrian conformal prediction: a guarantee per group).

Both are fitted on the validation split, scored under every imposed subset of the model's modalities (the
evaluate stage's missing-modality table does the same on test), so every pattern has calibration rows even
when the data rarely lacks a modality; a row counts once per pattern it yields (masking it to {image, text}
or to {image, text, audio} when its audio is missing anyway is the same input).

- Temperature scaling (category, set): the temperature minimising the validation negative log-likelihood
  (a bounded 1-D search on log T), per pattern when ``temperature: pattern`` and the pattern has at least
  ``min_pattern_rows`` rows, else the one fitted on the validation rows as they are (``global``). Dividing
  the logits by T never changes the top class; a set's tag decisions stay those of its tuned thresholds.
- Conformal score: the target's ``nonconformity`` (category: 1 - p(true class), LAC; set: the least probable
  true tag's 1 - p; number: |standardised residual|), under the pattern's temperature. A pattern's threshold
  is the ceil((n+1)(1-alpha))-th smallest score of its n rows (split conformal: coverage >= 1 - alpha on
  exchangeable rows; inf when n is too small for alpha: every class, an unbounded interval).
- Sparse patterns: a pattern with fewer than ``min_pattern_rows`` rows pools the rows of every pattern it
  contains (rows that lack at least what it lacks: harder, so the pooled threshold errs towards larger
  sets), and with still too few, every pattern's rows.

Everything is JSON (the bundle's manifest carries it; its predictor applies it with numpy alone:
mmpipe/deploy/predict.py mirrors ``apply``; export checks they agree).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

ALPHA_FORMAT = "{:g}"  # the JSON key of a level: "0.1"


def subsets(modalities: list[str]) -> list[tuple[str, ...]]:
    """The 2^n - 1 non-empty subsets, smallest first, in registry order (a, b, c, a+b, ...)."""
    return [c for k in range(1, len(modalities) + 1) for c in itertools.combinations(modalities, k)]


def pattern_key(flags, modalities: list[str]) -> str:
    """"image+audio": the modalities ``flags`` marks available, in the model's order ("" for none)."""
    return "+".join(m for m, ok in zip(modalities, flags) if ok)


def pattern_keys(available: np.ndarray, modalities: list[str]) -> list[str]:
    return [pattern_key(row, modalities) for row in np.asarray(available, bool)]


def contains(pattern: str, other: str) -> bool:
    """Whether ``other``'s modalities are all in ``pattern`` (other lacks at least what pattern lacks)."""
    return set(other.split("+")) <= set(pattern.split("+"))


def rows_by_pattern(available: np.ndarray, outputs_by_subset: dict[tuple[str, ...], np.ndarray],
                    modalities: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{pattern: (row indices, raw outputs)}: every row under every imposed subset, grouped by the modalities it
    then has (a row left with none is in no pattern); a (row, pattern) met again is the same input: kept once."""
    available = np.asarray(available, bool)
    weights = 1 << np.arange(len(modalities))
    groups: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    taken: dict[int, np.ndarray] = {}
    for subset, outputs in outputs_by_subset.items():
        if not subset:
            continue
        codes = (available & np.isin(modalities, subset)) @ weights
        for code in np.unique(codes[codes > 0]).tolist():
            seen = taken.setdefault(code, np.zeros(len(codes), bool))
            rows = np.flatnonzero((codes == code) & ~seen)
            seen[rows] = True
            groups.setdefault(code, ([], []))
            groups[code][0].append(rows)
            groups[code][1].append(np.asarray(outputs, np.float64)[rows])
    decoded = {code: pattern_key([(code >> i) & 1 for i in range(len(modalities))], modalities) for code in groups}
    return {decoded[code]: (np.concatenate(rows), np.concatenate(outs))
            for code, (rows, outs) in sorted(groups.items(), key=lambda kv: (bin(kv[0]).count("1"), kv[0]))}


def fit_temperature(target, outputs: np.ndarray, encoded: np.ndarray) -> float:
    """The temperature minimising ``target``'s mean negative log-likelihood of ``outputs`` (within e^-4..e^4)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda log_t: target.nll(outputs, encoded, math.exp(log_t)), bounds=(-4.0, 4.0),
                            method="bounded", options={"xatol": 1e-5})
    return float(math.exp(found.x))


def conformal_threshold(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold: the ceil((n+1)(1-alpha))-th smallest score; inf when that rank exceeds n."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-12)
    return math.inf if rank > n or n == 0 else float(np.sort(scores)[rank - 1])


def _pool(pattern: str, groups: dict[str, tuple[np.ndarray, np.ndarray]], min_rows: int) -> list[str]:
    """The patterns whose rows calibrate ``pattern``: itself with enough rows; else every pattern it contains;
    else all of them."""
    if len(groups.get(pattern, ((), ()))[0]) >= min_rows:
        return [pattern]
    within = [p for p in groups if contains(pattern, p)]
    if sum(len(groups[p][0]) for p in within) >= min_rows:
        return within
    return list(groups)


def fit(target, modalities: list[str], groups: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
        natural: np.ndarray, cfg) -> dict[str, Any]:
    """The calibration of one model from its validation split: ``groups`` (``rows_by_pattern``), ``labels`` (the
    split's encoded targets), ``natural`` (its raw outputs on the rows as they are: the global temperature).
    ``cfg``: evaluate.calibration (temperature, alpha, alphas, min_pattern_rows)."""
    min_rows = cfg.min_pattern_rows
    every = ["+".join(s) for s in subsets(modalities)]
    temperatures = None
    if target.TEMPERATURE and cfg.temperature != "none":
        overall = fit_temperature(target, natural, labels)
        temperatures = {"mode": cfg.temperature, "global": overall,
                        "patterns": {p: (fit_temperature(target, groups[p][1], labels[groups[p][0]])
                                         if cfg.temperature == "pattern" and p in groups
                                         and len(groups[p][0]) >= min_rows else overall) for p in every}}
    out: dict[str, Any] = {"type": target.NAME, "modalities": list(modalities), "score": target.CONFORMAL_SCORE,
                           "temperature": temperatures, "alpha": cfg.alpha, "alphas": sorted(set(cfg.alphas)),
                           "min_pattern_rows": min_rows, "rows": {p: int(len(groups[p][0])) if p in groups else 0
                                                                  for p in every},
                           "pooled": {}, "thresholds": {}}
    # for comparison only (evaluate reports it per pattern): one threshold for all rows, as plain split conformal
    overall_t = temperatures["global"] if temperatures else 1.0
    out["single_threshold"] = conformal_threshold(target.nonconformity(natural, labels, overall_t), cfg.alpha)
    out["single_threshold"] = None if math.isinf(out["single_threshold"]) else out["single_threshold"]
    for p in every:
        pool = _pool(p, groups, min_rows)
        if pool != [p]:
            out["pooled"][p] = pool
        t = temperature_of(out, p)
        scores = np.concatenate([target.nonconformity(groups[h][1], labels[groups[h][0]], t) for h in pool]) \
            if pool else np.zeros(0)
        for alpha in out["alphas"]:
            q = conformal_threshold(scores, alpha)
            out["thresholds"].setdefault(ALPHA_FORMAT.format(alpha), {})[p] = None if math.isinf(q) else q
    return out


def temperature_of(calibration: dict[str, Any], pattern: str) -> float:
    temperatures = calibration.get("temperature")
    if not temperatures:
        return 1.0
    return temperatures["patterns"].get(pattern, temperatures["global"])


def threshold_of(calibration: dict[str, Any], pattern: str, alpha: float | None = None) -> float:
    level = ALPHA_FORMAT.format(calibration["alpha"] if alpha is None else alpha)
    if level not in calibration["thresholds"]:
        raise ValueError(f"alpha {level} was not calibrated (calibrated: {', '.join(calibration['thresholds'])})")
    q = calibration["thresholds"][level].get(pattern)
    return math.inf if q is None else q


def apply(target, calibration: dict[str, Any], outputs: np.ndarray, patterns: list[str],
          alpha: float | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """(calibrated probabilities, None for a number; prediction sets or intervals) of raw ``outputs`` whose rows
    have the availability ``patterns``."""
    outputs = np.asarray(outputs, np.float64)
    t = np.array([temperature_of(calibration, p) for p in patterns])
    q = np.array([threshold_of(calibration, p, alpha) for p in patterns])
    probabilities = target.probabilities(outputs, t[:, None]) if target.TEMPERATURE else None
    return probabilities, target.prediction_sets(outputs, t[:, None], q)


def assess(target, calibration: dict[str, Any], groups: dict[str, tuple[np.ndarray, np.ndarray]],
           labels: np.ndarray, natural: np.ndarray, available: np.ndarray, bins: int,
           min_rows: int) -> dict[str, Any]:
    """How calibration and the prediction sets do on a held-out split (test): per pattern (``groups``: under
    imposed subsets) and on the rows as they are (``natural``, ``available``): coverage and mean set size at
    every calibrated level, ECE before and after temperature scaling (category, set). A pattern with fewer
    than ``min_rows`` rows is reported but marked ``small`` (the coverage gate skips it)."""
    modalities = calibration["modalities"]
    alpha = calibration["alpha"]

    def figures(outputs: np.ndarray, encoded: np.ndarray, patterns: list[str]) -> dict[str, Any]:
        row: dict[str, Any] = {"rows": int(len(encoded))}
        for level in calibration["alphas"]:
            probabilities, sets = apply(target, calibration, outputs, patterns, level)
            key = "" if level == alpha else f"_{ALPHA_FORMAT.format(level)}"
            row[f"coverage{key}"] = float(target.covers(sets, encoded).mean())
            sizes = target.set_sizes(sets)
            row[f"mean_size{key}"] = float(np.mean(sizes)) if np.isfinite(sizes).all() else None
            if level == alpha and target.NAME != "number":
                row["empty_sets"] = float((sizes == 0).mean())
        single = calibration.get("single_threshold")
        overall_t = calibration["temperature"]["global"] if calibration.get("temperature") else 1.0
        row["coverage_single_threshold"] = float(target.covers(target.prediction_sets(
            outputs, overall_t, np.full(len(encoded), math.inf if single is None else single)), encoded).mean())
        if target.TEMPERATURE and calibration.get("temperature"):
            row["ece"], _ = target.reliability(target.probabilities(outputs), encoded, bins)
            row["ece_calibrated"], _ = target.reliability(probabilities_at(outputs, patterns), encoded, bins)
            if calibration["temperature"]["mode"] == "pattern":  # what one global temperature would have given
                row["ece_global_temperature"], _ = target.reliability(
                    target.probabilities(outputs, calibration["temperature"]["global"]), encoded, bins)
        return row

    def probabilities_at(outputs: np.ndarray, patterns: list[str]) -> np.ndarray:
        t = np.array([temperature_of(calibration, p) for p in patterns])
        return target.probabilities(outputs, t[:, None])

    per_pattern = {}
    for p, (rows, outputs) in groups.items():
        per_pattern[p] = figures(outputs, labels[rows], [p] * len(rows))
        per_pattern[p]["small"] = len(rows) < min_rows
    natural_patterns = pattern_keys(available, modalities)
    usable = np.array([bool(p) for p in natural_patterns])
    marginal = figures(np.asarray(natural, np.float64)[usable], labels[usable],
                       [p for p in natural_patterns if p])
    out = {"alpha": alpha, "marginal": marginal, "patterns": per_pattern}
    if target.TEMPERATURE and calibration.get("temperature"):
        _, out["reliability"] = target.reliability(probabilities_at(natural[usable], [p for p in natural_patterns if p]),
                                                   labels[usable], bins)
    return out
