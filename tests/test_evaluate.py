"""Evaluation: metrics against hand-computed values, corruptions, featurizers rebuilt from state,
and the whole evaluate() on small trained models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from conftest import png_bytes, wav_bytes
from mmpipe import params
from mmpipe.evaluate.evaluate import SplitInputs, evaluate, failed_gates
from mmpipe.trust.calibration import subsets
from mmpipe.evaluate.metrics import area_under
from mmpipe.targets.metrics import calibration, classification
from mmpipe.evaluate.report import report_markdown, write_plot_data
from mmpipe.names import STATE_FILE
from mmpipe.modalities import MODALITIES, audio, image, text
from mmpipe.training.train import train

SMALL = params.ModelParams(dim=16, hidden=32, attention_heads=2, encoders={"image": {"width": 4}, "text": {"embed_dim": 8, "width": 16}, "audio": {"width": 4}})


def test_ece_of_an_overconfident_model():
    # 10 samples at confidence 0.9, 6 right: |0.6 - 0.9| = 0.3; 10 at 0.55, all right: 0.45 -> ECE 0.375
    probs = np.array([[0.9, 0.1]] * 10 + [[0.55, 0.45]] * 10)
    labels = np.array([0] * 6 + [1] * 4 + [0] * 10)
    ece, table = calibration(probs, labels, bins=10)
    assert ece == pytest.approx(0.5 * 0.3 + 0.5 * 0.45)
    assert [(round(r["confidence"], 2), r["accuracy"], r["samples"]) for r in table] == [(0.55, 1.0, 10), (0.9, 0.6, 10)]


def test_classification_matches_sklearn_and_counts():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    probs[np.arange(150), labels[:150]] += 2  # 150 surely right
    probs /= probs.sum(axis=1, keepdims=True)
    out = classification(probs, labels, ["a", "b", "c", "d"], ece_bins=15)
    predicted = probs.argmax(axis=1)
    assert out["summary"]["accuracy"] == pytest.approx((predicted == labels).mean())
    assert out["summary"]["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert out["confusion"].sum() == 200 and np.trace(out["confusion"]) == (predicted == labels).sum()
    assert sum(c["support"] for c in out["per_class"].values()) == 200


def test_area_under_the_robustness_curve():
    levels = [0.0, 0.5, 1.0]
    assert area_under(levels, [0.8, 0.8, 0.8]) == pytest.approx(0.8)
    assert area_under(levels, [1.0, 0.5, 0.0]) == pytest.approx(0.5)


def test_subsets_are_the_seven_non_empty_ones():
    assert ["+".join(s) for s in subsets(["image", "text", "audio"])] == [
        "image", "text", "audio", "image+text", "image+audio", "text+audio", "image+text+audio"]


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_corruptions_are_identity_at_zero_seeded_and_grow_with_level(modality):
    rng = np.random.default_rng(0)
    signal = {"image": rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
              "audio": np.sin(np.linspace(0, 300, 8 * 4000)).astype(np.float32).reshape(8, 4000),
              "text": ["seven", "three hundred", "nine and a half"] * 3}[modality]
    for name, corrupt in MODALITIES[modality].CORRUPTIONS.items():
        assert corrupt(signal, 0.0, np.random.default_rng(1)) is signal
        a = corrupt(signal, 0.5, np.random.default_rng(1))
        b = corrupt(signal, 0.5, np.random.default_rng(1))
        assert np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)), name

        def change(level):
            out = corrupt(signal, level, np.random.default_rng(2))
            if modality == "text":
                return np.mean([x != y for x, y in zip(out, signal)])
            return np.mean(np.abs(np.asarray(out, np.float64) - np.asarray(signal, np.float64)))
        assert 0 < change(0.2) < change(0.9), name


def test_corruptions_hit_their_stated_strength():
    grey = np.full((64, 3, 32, 32), 128, np.uint8)
    assert image.gaussian_noise(grey, 0.1, np.random.default_rng(0)).astype(float).std() == pytest.approx(25.5, rel=0.05)
    occluded = image.occlusion(grey, 0.25, np.random.default_rng(0))
    assert (occluded == 0).mean() == pytest.approx(0.25, abs=0.01)
    clips = np.sin(np.linspace(0, 3000, 64 * 16000)).astype(np.float32).reshape(64, 16000)
    noisy = audio.white_noise(clips, 0.5, np.random.default_rng(0))  # 30 - 40 * 0.5 = 10 dB
    snr = 10 * np.log10((clips ** 2).mean() / ((noisy - clips) ** 2).mean())
    assert snr == pytest.approx(10.0, abs=0.2)
    words = text.typos(["abcdefghij" * 50], 0.3, np.random.default_rng(0))[0]
    assert words != "abcdefghij" * 50 and 300 < len(words) < 700


@pytest.mark.parametrize("modality", ["image", "text", "audio"])
def test_featurizer_rebuilt_from_state_reproduces_the_stored_features(tiny_corpus, modality):
    data = SplitInputs(tiny_corpus / "features", tiny_corpus / "clean", split="test")
    rebuilt = data.corrupted(modality, next(iter(MODALITIES[modality].CORRUPTIONS)), 0.0, np.random.default_rng(0))
    for name, values in rebuilt.items():
        if name == "audio":  # float16 log-mel: BLAS blocking (threads) may move a value by one float16 step
            assert torch.allclose(values.float(), data.tensors[name].float(), rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(values, data.tensors[name]), name
    state = json.loads((tiny_corpus / "features" / modality / STATE_FILE).read_text())
    assert state["modality"] == modality


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    cfg = params.TrainParams(epochs=3, batch_size=32, device="cpu")
    for name, modalities in {"fusion": ["image", "text", "audio"], "baseline_text": ["text"]}.items():
        train(cfg, SMALL, tiny_corpus / "features", modalities, models / name, models / ".ck")
    return models


def test_evaluate_reports_every_number(tiny_corpus, trained, tmp_path):
    cfg = params.validate("evaluate", {"device": "cpu", "noise_levels": [0.0, 0.5, 1.0], "latency_runs": 5})
    result = evaluate(cfg, tiny_corpus / "features", tiny_corpus / "clean", trained, progress=lambda line: None)
    m = result["metrics"]
    n_test = len(SplitInputs(tiny_corpus / "features", tiny_corpus / "clean", "test"))
    assert m["split"] == "test" and m["test"]["samples"] == n_test
    assert set(m["test"]) >= {"accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "ece"}
    assert list(m["baselines"]) == ["text"] and m["best_baseline"] == "text"
    assert m["fusion_gain"] == pytest.approx(m["test"]["accuracy"] - m["baselines"]["text"]["accuracy"])
    assert len(m["missing"]) == 7 and m["missing"]["image+text+audio"]["accuracy"] == m["test"]["accuracy"]
    for modality in ("image", "text", "audio"):
        curve = result["tables"]["robustness"][modality]
        assert [row["level"] for row in curve] == [0.0, 0.5, 1.0]
        assert all(v == m["test"]["accuracy"] for k, v in curve[0].items() if k.startswith("fused_"))  # level 0 = clean
        assert 0.0 <= m["robustness"][modality]["relative"] <= 1.0
    assert m["robustness"]["text"]["baseline_relative"] is not None
    assert m["robustness"]["image"]["baseline_relative"] is None  # no image baseline trained here
    assert set(m["efficiency"]["latency_ms"]) == {"batch_1", "batch_64"}
    assert m["efficiency"]["latency_ms"]["batch_1"]["p50"] > 0

    again = evaluate(cfg, tiny_corpus / "features", tiny_corpus / "clean", trained, progress=lambda line: None)
    strip = lambda metrics: {k: v for k, v in metrics.items() if k != "efficiency"}  # noqa: E731 (timings vary)
    assert strip(again["metrics"]) == strip(m)  # deterministic, corruptions included

    write_plot_data(result["tables"], tmp_path)
    assert (tmp_path / "confusion.csv").read_text().count("\n") == n_test + 1
    figures = tmp_path / "figures"
    figures.mkdir()
    markdown = report_markdown(m, result["tables"], [], figures, "figures")
    assert sorted(p.name for p in figures.iterdir()) == ["confusion.png", "missing.png", "reliability.png",
                                                          "robustness.png", "trust.png"]
    assert "## How far to trust it" in markdown
    # how far to trust it: fitted on val, assessed on test per availability pattern; Shapley from the subsets
    assert set(m["conformal"]["patterns"]) == {"+".join(s) for s in subsets(["image", "text", "audio"])}
    assert m["calibration"]["thresholds"].keys() == {"0.05", "0.1", "0.2"}
    shapley = m["attribution"]["accuracy"]
    assert shapley["all"] == m["test"]["accuracy"]
    assert sum(shapley["shapley"].values()) == pytest.approx(shapley["all"] - shapley["none"], abs=1e-9)
    assert (tmp_path / "coverage.csv").read_text().splitlines()[0] == \
        "pattern,rows,coverage,coverage_single_threshold,mean_size,target"
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures.iterdir())
    assert "](figures/robustness.png)" in markdown and "All quality gates pass." in markdown


def test_gates_fail_one_line_each():
    metrics = {"test": {"accuracy": 0.91, "f1_macro": 0.90}, "fusion_gain": None}
    gates = params.validate("evaluate", {"gates": {"min_accuracy": 0.999, "min_f1_macro": 0.5,
                                                   "min_fusion_gain": 0.1}}).gates
    assert failed_gates(metrics, gates) == ([
        "quality gate evaluate.gates.min_accuracy failed: test accuracy is 0.9100, below 0.999",
        "quality gate evaluate.gates.min_fusion_gain: no fusion gain over the best baseline to check "
        "(train.baselines is false)"], {})
    assert failed_gates(metrics, params.EvaluateParams().gates) == ([], {})


def test_gates_by_metric_name_and_class_gates_skipped_for_a_number():
    metrics = {"target": {"type": "number", "headline": "r2"}, "test": {"samples": 9, "r2": 0.55, "rmse": 41.0},
               "fusion_gain": 0.1}
    gates = params.validate("evaluate", {"gates": {"min_accuracy": 0.9, "min": {"r2": 0.6}, "max": {"rmse": 40, "mape": 1},
                                                   "min_fusion_gain": 0.05}}).gates
    failed, skipped = failed_gates(metrics, gates)
    assert failed == ["quality gate evaluate.gates.min.r2 failed: test r2 is 0.5500, below 0.6",
                      "quality gate evaluate.gates.max.rmse failed: test rmse is 41.0000, above 40.0",
                      "evaluate.gates.max.mape: this number target has no test mape (its metrics: r2, rmse)"]
    assert list(skipped) == ["min_accuracy"]  # the default bar of a class: not this target's, said and not checked


def test_the_collapse_gate_fails_naming_the_one_modality_the_model_leans_on(tmp_path):
    """A user's manifest in which only the text says the class (the photos and recordings are noise the label
    does not depend on), trained like any other: the fused model leans on text alone, and
    evaluate.gates.max_modality_share fails in one line naming it; Shapley efficiency holds on the real model."""
    import pandas as pd

    from mmpipe.data.clean import clean
    from mmpipe.data.collect import collect
    from mmpipe.features.preprocess import preprocess
    from mmpipe.modalities import names

    files = tmp_path / "files"
    files.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(450):
        label = ["ant", "bee", "cat"][i % 3]
        (files / f"{i}.png").write_bytes(png_bytes(size=(32, 32), seed=i))
        (files / f"{i}.wav").write_bytes(wav_bytes(rng.normal(0, 0.2, 8000).astype(np.float32)))
        rows.append({"image": f"{i}.png", "audio": f"{i}.wav", "label": label,
                     "text": f"{['a photo of', 'look, a', 'here is one'][i % 4 % 3]} {label}"})
    pd.DataFrame(rows).to_csv(files / "manifest.csv", index=False)
    root = tmp_path / "run"
    for folder in ("raw", "clean", *(f"features/{m}" for m in names())):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"source": str(files / "manifest.csv"), "workers": 1}), root / "raw")
    clean(params.validate("clean", {"workers": 1}), root / "raw", root / "clean")
    for m in names():
        preprocess(m, params.validate("preprocess", {"workers": 1}), root / "clean", root / "features" / m)
    train(params.TrainParams(epochs=10, batch_size=32, device="cpu"), SMALL, root / "features", ["image", "text", "audio"],
          root / "models" / "fusion", None)
    cfg = params.validate("evaluate", {"device": "cpu", "noise_levels": [0.0, 1.0], "latency_runs": 5,
                                       "gates": {"min_accuracy": None, "max_modality_share": 0.9}})
    m = evaluate(cfg, root / "features", root / "clean", root / "models", progress=lambda line: None)["metrics"]
    shapley = m["attribution"]["accuracy"]
    assert m["test"]["accuracy"] > 0.9 and shapley["share"]["text"] > 0.9
    assert abs(sum(shapley["shapley"].values()) - (shapley["all"] - shapley["none"])) < 1e-9
    failed, _ = failed_gates(m, cfg.gates)
    assert len(failed) == 1 and failed[0].startswith(
        f"quality gate evaluate.gates.max_modality_share failed: text carries {shapley['share']['text']:.1%} of the "
        "fused model's Shapley attribution (above 90%)")
