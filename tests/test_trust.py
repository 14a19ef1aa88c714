"""How far to trust it (mmpipe/trust): temperature scaling, Mondrian split-conformal sets per availability
pattern for each target type, exact Shapley attribution, and the gates built on them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mmpipe import params
from mmpipe.evaluate.evaluate import failed_gates
from mmpipe.targets import target_of
from mmpipe.trust import attribution, calibration

MODALITIES = ["image", "text", "audio"]
CATEGORY = target_of({"type": "category", "column": "label", "state": {"labels": ["a", "b", "c", "d"]}})
NUMBER = target_of({"type": "number", "column": "price", "transform": "log",
                    "state": {"transform": "log", "mean": 3.0, "std": 0.5, "train_std": 10.0}})
TAGS = target_of({"type": "set", "column": "tags", "state": {"tags": ["x", "y", "z"], "thresholds": [0.5, 0.4, 0.6],
                                                             "pos_weight": [1, 1, 1]}})


def cfg(**overrides):
    return params.validate("evaluate", {"calibration": overrides}).calibration


# ---------------------------------------------------------------------------- Shapley

def random_game(players, rng):
    return {frozenset(s): float(rng.normal()) for k in range(len(players) + 1)
            for s in itertools.combinations(players, k)}


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_shapley_efficiency_holds_to_1e_9(m):
    players = [f"m{i}" for i in range(m)]
    value = random_game(players, np.random.default_rng(m))
    phi = attribution.shapley(players, value)
    assert abs(sum(phi.values()) - (value[frozenset(players)] - value[frozenset()])) < 1e-9


def test_shapley_of_known_games():
    # additive: each player's own worth, no interaction
    worth = {"image": 0.3, "text": 0.1, "audio": 0.5}
    additive = {frozenset(s): sum(worth[p] for p in s) for k in range(4) for s in itertools.combinations(MODALITIES, k)}
    assert attribution.shapley(MODALITIES, additive) == pytest.approx(worth)
    assert attribution.interactions(MODALITIES, additive) == pytest.approx({"image+text": 0, "image+audio": 0,
                                                                            "text+audio": 0})
    # redundant: any one modality gives everything -> equal shares, negative pairwise interaction
    redundant = {s: (1.0 if s else 0.0) for s in additive}
    assert attribution.shapley(MODALITIES, redundant) == pytest.approx({m: 1 / 3 for m in MODALITIES})
    assert all(v < 0 for v in attribution.interactions(MODALITIES, redundant).values())
    # a dummy (audio adds nothing) gets 0; a symmetric pair gets the same
    dummy = {s: (0.8 if {"image", "text"} <= s else 0.2 if s & {"image", "text"} else 0.0) for s in additive}
    phi = attribution.shapley(MODALITIES, dummy)
    assert phi["audio"] == pytest.approx(0) and phi["image"] == pytest.approx(phi["text"]) == pytest.approx(0.4)
    assert attribution.shares(phi) == pytest.approx({"image": 0.5, "text": 0.5, "audio": 0.0})
    assert attribution.shares({"image": -0.1, "text": 0.0}) is None  # nothing contributes: nothing to share


# ---------------------------------------------------------------------------- conformal, temperature

def test_conformal_threshold_is_the_finite_sample_rank():
    scores = np.arange(1, 20) / 20  # 19 scores: ceil(20 * 0.9) = 18th smallest
    assert calibration.conformal_threshold(scores, 0.1) == pytest.approx(18 / 20)
    assert calibration.conformal_threshold(scores[:8], 0.1) == math.inf  # ceil(9 * 0.9) = 9 > 8 rows
    assert calibration.conformal_threshold(np.zeros(0), 0.1) == math.inf


def test_split_conformal_covers_exchangeable_rows_at_the_promised_rate():
    rng = np.random.default_rng(0)
    hits = []
    for _ in range(2000):
        cal, test = rng.exponential(size=200), rng.exponential(size=200)
        hits.append((test <= calibration.conformal_threshold(cal, 0.1)).mean())
    # E[coverage] = ceil(201 * 0.9) / 201 = 0.9005; the mean of 2,000 draws is within 0.0007 of it (1 sd)
    assert np.mean(hits) == pytest.approx(181 / 201, abs=0.0025)


def test_temperature_scaling_finds_the_overconfidence_and_keeps_the_answers():
    rng = np.random.default_rng(1)
    honest = rng.normal(0, 2, (4000, 4))  # labels drawn from these logits' own softmax: perfectly calibrated
    p = CATEGORY.probabilities(honest)
    labels = (rng.random((4000, 1)) > p.cumsum(1)).sum(1)
    t = calibration.fit_temperature(CATEGORY, honest * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    ece_before, _ = CATEGORY.reliability(CATEGORY.probabilities(honest * 3), labels, 15)
    ece_after, _ = CATEGORY.reliability(CATEGORY.probabilities(honest * 3, t), labels, 15)
    assert ece_after < 0.03 < ece_before
    assert (CATEGORY.probabilities(honest * 3, t).argmax(1) == honest.argmax(1)).all()


def synthetic_split(rng, n):
    """A split of 3 modalities, ~15 % missing each, and raw outputs under every subset: the more modalities a
    row has, the sharper (and more often right) its logits."""
    labels = rng.integers(0, 4, n)
    available = rng.random((n, 3)) > 0.15
    available[~available.any(1), 0] = True
    noise = rng.normal(0, 1, (n, 4))
    outputs = {}
    for subset in [(), *calibration.subsets(MODALITIES)]:
        have = (available & np.isin(MODALITIES, subset)).sum(1)
        z = noise.copy()
        z[np.arange(n), labels] += 0.9 * have  # a modality: more signal
        outputs[subset] = z * 2.0  # over-confident
    return labels, available, outputs


def test_mondrian_sets_cover_every_pattern_where_one_threshold_does_not():
    rng = np.random.default_rng(2)
    val, test = synthetic_split(rng, 3000), synthetic_split(rng, 3000)
    fitted = calibration.fit(CATEGORY, MODALITIES, calibration.rows_by_pattern(val[1], val[2], MODALITIES), val[0],
                             val[2][tuple(MODALITIES)], cfg())
    assert set(fitted["thresholds"]["0.1"]) == {"+".join(s) for s in calibration.subsets(MODALITIES)}
    assert fitted["temperature"]["global"] > 1.0 and not fitted["pooled"]  # over-confident; every pattern has rows
    groups = calibration.rows_by_pattern(test[1], test[2], MODALITIES)
    assessed = calibration.assess(CATEGORY, fitted, groups, test[0], test[2][tuple(MODALITIES)], test[1], 15, 100)
    for pattern, row in assessed["patterns"].items():
        assert 0.87 <= row["coverage"] <= 0.93, (pattern, row)
        assert 0.93 <= row["coverage_0.05"] and row["coverage_0.2"] <= 0.84
        assert row["ece_calibrated"] < 0.05  # per-pattern temperatures: calibrated in every pattern
    assert assessed["patterns"]["image"]["coverage_single_threshold"] < 0.8  # one threshold: the hard pattern under-covered
    assert assessed["patterns"]["image"]["mean_size"] > assessed["patterns"]["image+text+audio"]["mean_size"]
    assert 0.87 <= assessed["marginal"]["coverage"] <= 0.93


def test_a_row_counts_once_per_pattern_it_yields():
    available = np.array([[1, 1, 0], [1, 1, 1]], bool)  # row 0 has no audio
    outputs = {s: np.full((2, 4), float(len(s))) for s in [(), *calibration.subsets(MODALITIES)]}
    groups = calibration.rows_by_pattern(available, outputs, MODALITIES)
    assert groups["image+text"][0].tolist() == [0, 1]  # row 0 under {image, text} and {image, text, audio}: once
    assert groups["image+text+audio"][0].tolist() == [1] and "" not in groups
    assert sum(len(rows) for rows, _ in groups.values()) == 3 + 7  # row 0: i, t, i+t; row 1: all seven


def test_sparse_patterns_pool_the_patterns_they_contain():
    rng = np.random.default_rng(3)
    labels, available, outputs = synthetic_split(rng, 400)
    available[:, 2] = rng.random(400) < 0.1  # audio is rare: its patterns are sparse
    groups = calibration.rows_by_pattern(available, outputs, MODALITIES)
    fitted = calibration.fit(CATEGORY, MODALITIES, groups, labels, outputs[tuple(MODALITIES)], cfg(min_pattern_rows=100))
    assert fitted["rows"]["image+text+audio"] < 100
    assert set(fitted["pooled"]["image+text+audio"]) == set(groups) - {""}  # every pattern it contains
    assert fitted["pooled"]["audio"] == list(groups)  # too few even pooled: all rows
    assert fitted["temperature"]["patterns"]["audio"] == fitted["temperature"]["global"]


def test_alpha_must_be_calibrated():
    with pytest.raises(Exception, match="alpha 0.3 must be one of alphas"):
        params.validate("evaluate", {"calibration": {"alpha": 0.3}})
    with pytest.raises(Exception, match="min_coverage 0.85 is above 1 - calibration.alpha"):
        params.validate("evaluate", {"calibration": {"alpha": 0.2}, "gates": {"min_coverage": 0.85}})
    rng = np.random.default_rng(4)
    labels, available, outputs = synthetic_split(rng, 300)
    fitted = calibration.fit(CATEGORY, MODALITIES, calibration.rows_by_pattern(available, outputs, MODALITIES),
                             labels, outputs[tuple(MODALITIES)], cfg())
    with pytest.raises(ValueError, match=r"alpha 0.3 was not calibrated \(calibrated: 0.05, 0.1, 0.2\)"):
        calibration.threshold_of(fitted, "image", 0.3)


# ---------------------------------------------------------------------------- number and set targets

def test_number_intervals_in_the_users_units_cover_per_pattern():
    rng = np.random.default_rng(5)
    n = 3000
    available = rng.random((n, 3)) > 0.15
    available[~available.any(1), 0] = True

    def split():
        y = rng.normal(0, 1, n)  # standardised log prices
        outputs = {}
        for subset in [(), *calibration.subsets(MODALITIES)]:
            have = (available & np.isin(MODALITIES, subset)).sum(1)
            outputs[subset] = (y + rng.normal(0, 1.0 / (1 + have)))[:, None]  # more modalities: smaller error
        return y, outputs
    (val_y, val_out), (test_y, test_out) = split(), split()
    fitted = calibration.fit(NUMBER, MODALITIES, calibration.rows_by_pattern(available, val_out, MODALITIES), val_y,
                             val_out[tuple(MODALITIES)], cfg())
    assert fitted["temperature"] is None  # a number: its interval is its calibration
    q = fitted["thresholds"]["0.1"]
    assert q["image"] > q["image+text"] > q["image+text+audio"]  # fewer modalities: wider
    groups = calibration.rows_by_pattern(available, test_out, MODALITIES)
    assessed = calibration.assess(NUMBER, fitted, groups, test_y, test_out[tuple(MODALITIES)], available, 15, 100)
    assert all(0.87 <= row["coverage"] <= 0.93 for row in assessed["patterns"].values())
    _, intervals = calibration.apply(NUMBER, fitted, np.array([[0.0]]), ["image"])
    # log1p transform: the interval around the same standardised prediction is asymmetric in dollars
    low, high = intervals[0]
    centre = math.expm1(3.0)
    assert low < centre < high and high - centre > centre - low
    assert low == pytest.approx(math.expm1(3.0 - 0.5 * q["image"]))


def test_tag_sets_hold_every_true_tag_and_answers_do_not_change():
    rng = np.random.default_rng(6)
    n = 2000
    honest = rng.normal(-1, 2, (n, 3))
    truth = rng.random((n, 3)) < TAGS.probabilities(honest)  # tags drawn from the honest probabilities
    logits = 3 * honest  # over-confident
    outputs = {s: logits for s in [(), *calibration.subsets(MODALITIES)]}
    available = np.ones((n, 3), bool)
    fitted = calibration.fit(TAGS, MODALITIES, calibration.rows_by_pattern(available, outputs, MODALITIES),
                             truth.astype(np.float32), logits, cfg(temperature="global"))
    assert fitted["temperature"]["global"] == pytest.approx(3.0, rel=0.1) and fitted["score"] == "all_true_tags"
    probabilities, sets = calibration.apply(TAGS, fitted, logits, ["image+text+audio"] * n)
    covered = TAGS.covers(sets, truth.astype(np.float32))
    assert 0.86 <= covered.mean() <= 0.94
    assert (probabilities[~truth.any(1)] >= 0).all() and covered[~truth.any(1)].all()  # no tags: always covered
    # the tags answered come from the tuned thresholds on the uncalibrated scores: unchanged by the temperature
    t = fitted["temperature"]["global"]
    answered = TAGS.probabilities(logits) >= TAGS.thresholds
    recomputed = probabilities >= 1 / (1 + np.exp(-np.log(TAGS.thresholds / (1 - TAGS.thresholds)) / t))
    assert (answered == recomputed).mean() > 0.999


# ---------------------------------------------------------------------------- gates

def trust_metrics(coverage: float, shares: dict) -> dict:
    row = {"rows": 500, "coverage": coverage}
    return {"test": {"accuracy": 0.97}, "fusion_gain": None, "calibration": {"min_pattern_rows": 100},
            "conformal": {"alpha": 0.1, "marginal": row, "patterns": {"image": row, "audio": {"rows": 20, "coverage": 0.5}}},
            "attribution": {"accuracy": {"share": shares}}}


def test_coverage_and_collapse_gates_fail_in_one_line_naming_the_pattern_and_modality():
    gates = params.validate("evaluate", {"gates": {"min_accuracy": None, "min_coverage": 0.85,
                                                   "max_modality_share": 0.9}}).gates
    ok = trust_metrics(0.9, {"image": 0.3, "text": 0.3, "audio": 0.4})
    assert failed_gates(ok, gates) == ([], {})  # audio's 20 test rows: too few to gate
    failed, _ = failed_gates(trust_metrics(0.8, {"image": 0.02, "text": 0.95, "audio": 0.03}), gates)
    assert failed == [
        "quality gate evaluate.gates.min_coverage failed: the conformal sets at alpha 0.1 hold the truth in 0.8000 of "
        "500 test rows marginally, below 0.85",
        "quality gate evaluate.gates.min_coverage failed: the conformal sets at alpha 0.1 hold the truth in 0.8000 of "
        "500 test rows with only image available, below 0.85",
        "quality gate evaluate.gates.max_modality_share failed: text carries 95.0% of the fused model's Shapley "
        "attribution (above 90%): the model leans on text and little on the others (modality collapse; reports/eval.md)"]


# ---------------------------------------------------------------------------- drift monitor

def test_drift_distances_are_kolmogorov_smirnov_and_total_variation():
    from scipy.stats import ks_2samp

    from mmpipe.trust import drift

    rng = np.random.default_rng(7)
    train, window = rng.normal(0, 1, 800), rng.normal(0.3, 1, 300)
    reference = drift.summarize(train, "numeric")  # 800 values < 1,000 points: every one kept
    assert drift.distance(reference, window) == pytest.approx(ks_2samp(train, window).statistic, abs=2e-3)
    discrete = drift.summarize(np.repeat([1.0, 2.0, 3.0], [500, 300, 200]), "numeric")  # ties survive
    assert drift.distance(discrete, np.repeat([1.0, 2.0, 3.0], [50, 30, 20])) == pytest.approx(0, abs=2e-3)
    counts = drift.summarize(np.array([0, 0, 1, 1, np.nan, 2, 2, 2]), "categorical")  # NaN: rows without it
    assert counts["frequencies"] == {"0": pytest.approx(2 / 7), "1": pytest.approx(2 / 7), "2": pytest.approx(3 / 7)}
    assert drift.distance(counts, np.array([0.0] * 10)) == pytest.approx(5 / 7)


def drift_rows(rng, n, shift=0.0, missing=0.0):
    """Per-row statistics of two modalities: image brightness (shifted by ``shift`` sd), audio loudness, and
    whether each is there (audio missing in a ``missing`` share of rows)."""
    audio_there = rng.random(n) >= missing
    return {"image.brightness": ("numeric", rng.normal(0.5 + 0.1 * shift, 0.1, n)),
            "image.available": ("categorical", np.ones(n)),
            "audio.loudness": ("numeric", np.where(audio_there, rng.gamma(4.0, 1.0, n), np.nan)),
            "audio.available": ("categorical", audio_there.astype(float))}


def test_the_drift_threshold_holds_its_false_alarm_rate_and_names_what_moved():
    from mmpipe.trust import drift

    rng = np.random.default_rng(8)
    train, heldout = drift_rows(rng, 3000), drift_rows(rng, 800)
    reference = drift.fit(train, {k: v for k, (_, v) in heldout.items()}, window_rows=200, windows=400, false_alarm=0.05)
    assert reference["false_alarm_measured"] <= 0.08 and set(reference["statistics"]) == set(train)
    assert reference["scale"]["image.available"] == drift.SCALE_FLOOR  # constant: the floor, still monitored

    def alarms(**shift):
        verdicts = [drift.score(reference, {k: v for k, (_, v) in drift_rows(rng, 200, **shift).items()})
                    for _ in range(100)]
        return verdicts, np.mean([v["drifted"] for v in verdicts])
    _, quiet = alarms()
    assert quiet <= 0.08  # fresh in-distribution windows of the population the held-out rows came from
    verdicts, power = alarms(shift=0.5)
    assert power >= 0.95 and all(v["statistic"] == "image.brightness" for v in verdicts if v["drifted"])
    verdicts, power = alarms(missing=0.3)  # the audio stopped arriving for a third of the rows
    assert power == 1.0 and {v["statistic"] for v in verdicts} == {"audio.available"}
    few = drift.score(reference, {k: v[:10] for k, (_, v) in drift_rows(rng, 10).items()})
    assert not few["judged"] and "too few to judge" in few["why"]
