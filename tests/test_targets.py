"""Targets beyond one class: numbers (regression) and tag sets (multi-label). Cells parsed and rejected
with reasons, unlabelled rows kept out of supervised training, state fitted on the train split only
(set thresholds on the validation split only), and each type through train -> evaluate -> compress ->
export -> the bundle's predictor -> the MLflow pyfunc on a tiny built-in corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmpipe import params
from mmpipe.data import clean as clean_module
from mmpipe.data import collect as collect_module
from mmpipe.features.loader import FeatureSet
from mmpipe.modalities import names
from mmpipe.targets import UNLABELLED, BadTarget, target_of
from mmpipe.targets.metrics import multilabel, regression

SMALL = params.ModelParams(dim=16, hidden=32, attention_heads=2, encoders={
    "image": {"width": 8}, "text": {"embed_dim": 8, "width": 16}, "audio": {"width": 8}, "tabular": {"width": 16}})


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize("cell, code", [("abc", "target_not_a_number"), ("inf", "target_not_finite"),
                                        ("nan", "target_not_finite"), ("-2.5", "target_negative_under_log")])
def test_bad_number_cells_are_rejected_with_a_code_and_a_reason(cell, code):
    with pytest.raises(BadTarget) as info:
        target_of({"type": "number", "transform": "log"}).parse(cell)
    assert info.value.code == code and cell in info.value.reason


def test_number_and_set_cells_parse_to_canonical_text_and_empty_is_unlabelled():
    number = target_of({"type": "number"})
    assert number.parse(" 412.5 ") == "412.5" and number.parse("7") == "7.0" and number.parse("-3") == "-3.0"
    assert number.parse(None) == number.parse("  ") == UNLABELLED
    tags = target_of({"type": "set", "separator": "|"})
    assert tags.parse("bearing| loose |bearing") == '["bearing", "loose"]'
    assert tags.parse('["b", "a"]') == '["a", "b"]'  # a JSON list (JSONL, Parquet list cells)
    assert tags.parse(None) == tags.parse("") == "[]"  # empty: none of the tags ...
    assert target_of({"type": "set", "empty": "unlabelled"}).parse(None) == UNLABELLED  # ... or unlabelled
    with pytest.raises(BadTarget, match="not a list of strings"):
        tags.parse("[1, 2]")
    assert target_of(None).parse(" seven ") == "seven" and target_of(None).parse(None) == UNLABELLED


def test_number_state_round_trips_through_the_log_transform():
    number = target_of({"type": "number", "transform": "log"})
    number = number.fitted(number.fit(["0.0", "9.0", "99.0"], []))
    assert number.state["mean"] == pytest.approx(np.mean(np.log1p([0, 9, 99])))
    encoded = number.encode(["9.0", "99.0"])
    assert number.decode(encoded) == pytest.approx([9.0, 99.0], rel=1e-5)
    assert number.scores(torch.from_numpy(encoded[:, None])).numpy() == pytest.approx([9.0, 99.0], rel=1e-5)
    assert number.answer(np.array([412.5])) == {"value": 412.5}


def test_tag_vocabulary_min_count_and_positive_weights_from_train():
    tags = target_of({"type": "set", "min_count": 2})
    state = tags.fit(['["a", "b"]', '["a"]', '["a", "c"]', "[]"], [])
    assert state["tags"] == ["a"] and state["rare_tags_dropped"] == ["b", "c"]
    assert state["pos_weight"] == [pytest.approx(1 / 3)]  # 3 of 4 rows have "a": 1 negative per 3 positives
    with pytest.raises(ValueError, match="no tag occurs in 5 or more train rows"):
        target_of({"type": "set", "min_count": 5}).fit(['["a"]'], [])


def test_thresholds_are_each_tags_best_f1_on_the_scores_given():
    tags = target_of({"type": "set"})
    tags = tags.fitted(tags.fit(['["a", "b"]', '["a"]'], []))
    scores = np.array([[0.9, 0.2], [0.3, 0.25], [0.1, 0.9], [0.2, 0.1]])
    truth = np.array([[1, 1], [1, 1], [0, 1], [0, 0]], np.float32)
    tuned = tags.fit_on_val(scores, truth)["thresholds"]
    assert tuned[0] == pytest.approx(0.3) and tuned[1] == pytest.approx(0.2)  # every positive above, no negative
    assert tags.fitted({**tags.state, "thresholds": tuned}).headline(scores, truth) == 1.0


def test_regression_and_multilabel_metrics_match_their_definitions():
    truth, predicted = np.array([1.0, 2.0, 4.0, 0.0]), np.array([1.5, 2.0, 3.0, 0.5])
    out = regression(predicted, truth)
    assert out["mae"] == pytest.approx(0.5) and out["rmse"] == pytest.approx(math.sqrt(1.5 / 4))
    assert out["r2"] == pytest.approx(1 - 1.5 / np.sum((truth - truth.mean()) ** 2))
    assert out["median_ape"] == pytest.approx(0.25) and out["zero_targets"] == 1
    probs = np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6]])
    report = multilabel(probs, np.array([[1, 0], [1, 0], [0, 1]], bool), np.array([0.5, 0.5]), ["x", "y"], 5)
    s = report["summary"]  # predicted {x}, {x, y}, {y}: 3 true positives, 1 false positive
    assert s["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1)) and s["subset_accuracy"] == pytest.approx(2 / 3)
    assert report["per_tag"]["y"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1,
                                                    "threshold": 0.5, "ece": report["per_tag"]["y"]["ece"]})


# --------------------------------------------------------------------------- collect and clean


def manifest_rows() -> list[dict]:
    rows = [{"id": f"r{i}", "text": f"listing number {i}", "price": str(10 + i), "tags": "a;b" if i % 2 else "a"}
            for i in range(40)]
    rows += [{"id": "bad-text", "text": "x1", "price": "twelve", "tags": "a"},
             {"id": "bad-inf", "text": "x2", "price": "inf", "tags": "a"},
             {"id": "bad-negative", "text": "x3", "price": "-4", "tags": "a"},
             {"id": "no-price", "text": "x4", "price": None, "tags": None},
             {"id": "no-price-2", "text": "x5", "price": "", "tags": '["b"]'}]
    return rows


def run_data(tmp_path, data_params, target: dict, **data):
    path = tmp_path / "m.csv"
    pd.DataFrame(manifest_rows()).to_csv(path, index=False)
    raw, out = tmp_path / "raw", tmp_path / "clean"
    for folder in (raw, out):
        folder.mkdir(exist_ok=True)
    collect_module.collect(data_params(source=str(path), target=target, **data), raw)
    metrics = clean_module.clean(params.validate("clean", {"workers": 1, "min_per_class": 1}), raw, out)
    kept = pd.concat(pq.read_table(p).to_pandas() for p in sorted((out / "samples").glob("part-*.parquet")))
    rejects = pq.read_table(out / "rejects.parquet").to_pandas()
    return metrics, kept, rejects, json.loads((out / "dataset.json").read_text())


def test_a_number_column_bad_cells_rejected_unlabelled_kept_and_the_transform_fitted_on_train(tmp_path, data_params):
    metrics, kept, rejects, dataset = run_data(tmp_path, data_params, {"column": "price", "type": "number",
                                                                       "transform": "log"}, tabular={"columns": "auto"})
    assert dict(zip(rejects.sample_id, rejects.code)) == {"bad-text": "target_not_a_number", "bad-inf": "target_not_finite",
                                                          "bad-negative": "target_negative_under_log"}
    assert set(rejects.action) == {"sample_rejected"} and set(rejects.modality) == {"label"}
    unlabelled = set(kept.sample_id[kept.label == ""])
    assert unlabelled == {"no-price", "no-price-2"} and sum(metrics["unlabelled"].values()) == 2
    train = kept[(kept.split == "train") & (kept.label != "")]
    state = dataset["target"]["state"]
    assert state["train_rows"] == len(train) < len(kept) - 2  # val and test rows are not in the fit
    assert state["mean"] == pytest.approx(np.log1p(train.label.astype(float)).mean())
    assert dataset["target"]["column"] == "price" and metrics["target"]["transform"] == "log"
    gathered = dataset["clean_rules"]["tabular"]["columns"]  # data.tabular.columns: auto
    assert "tags" in gathered and "price" not in gathered  # every other column may be an input, the target never


def test_a_tag_column_parses_lists_and_separators(tmp_path, data_params):
    metrics, kept, rejects, dataset = run_data(tmp_path, data_params, {"column": "tags", "type": "set"})
    assert len(rejects) == 0 and dataset["labels"] == ["a", "b"] == dataset["target"]["state"]["tags"]
    by_id = dict(zip(kept.sample_id, kept.label))
    assert by_id["r1"] == '["a", "b"]' and by_id["r2"] == '["a"]' and by_id["no-price-2"] == '["b"]'
    assert by_id["no-price"] == "[]"  # empty: none of the tags (data.target.empty: no_tags)
    assert metrics["target"]["empty_sets"] == 1 and metrics["per_class"] == {}


def test_a_folder_cannot_hold_a_number_target(tmp_path, data_params):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "cat" / "a.txt").write_text("meow")
    with pytest.raises(Exception, match="a folder's layout gives one class per sample"):
        collect_module.collect(data_params(source=str(tmp_path / "data"), target={"type": "number"}), tmp_path)


# --------------------------------------------------------------------------- each type end to end


@pytest.fixture(scope="module", params=["number", "set"])
def trained(request, tmp_path_factory):
    """A tiny built-in corpus with a number (the digit's value) or a set (its properties) target, through
    collect, clean, preprocess, train (fusion + the text baseline), evaluate, compress (pruned, int8) and
    export. (A user's manifest with each type goes through `dvc repro` in test_pipeline.)"""
    from mmpipe.compress.compress import compress
    from mmpipe.data.clean import clean
    from mmpipe.data.collect import collect
    from mmpipe.deploy.export import export
    from mmpipe.evaluate.evaluate import evaluate
    from mmpipe.features.preprocess import preprocess
    from mmpipe.training.train import train

    kind = request.param
    root = tmp_path_factory.mktemp(f"target_{kind}")
    for folder in ("raw", "clean", "compressed", "deploy", *(f"features/{m}" for m in names())):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"n_samples": 240, "workers": 1, "builtin": {"tts_variants": 4, "tabular": True},
                                     "target": {"type": kind}}), root / "raw")
    clean(params.validate("clean", {"workers": 1}), root / "raw", root / "clean")
    for m in names():
        preprocess(m, params.validate("preprocess", {"workers": 1}), root / "clean", root / "features" / m)
    cfg = params.TrainParams(epochs=4, batch_size=32, device="cpu")
    results = {name: train(cfg, SMALL, root / "features", modalities, root / "models" / name, None)
               for name, modalities in {"fusion": list(names()), "baseline_text": ["text"]}.items()}
    evaluated = evaluate(params.validate("evaluate", {"device": "cpu", "noise_levels": [0.0, 1.0], "latency_runs": 5}),
                         root / "features", root / "clean", root / "models", progress=lambda line: None)
    compressed = compress(params.validate("compress", {"latency_runs": 5, "max_accuracy_drop": 1.0,
                                                       "prune": {"finetune_epochs": 1},
                                                       "quantize": {"calibration_samples": 64, "layers": "all"}}),
                          root / "features", root / "models" / "fusion", root / "compressed", progress=lambda line: None)
    checks, example = export(params.ExportParams(), root / "deploy", root / "compressed", root / "models" / "fusion",
                             root / "features", root / "raw", root / "clean", evaluated["metrics"], compressed)
    return {"kind": kind, "root": root, "train": results, "eval": evaluated, "compress": compressed, "checks": checks,
            "example": example}


def test_train_selects_by_the_targets_headline_and_set_thresholds_come_from_validation(trained):
    kind, root = trained["kind"], trained["root"]
    headline = {"number": "r2", "set": "f1_micro"}[kind]
    fusion = trained["train"]["fusion"]
    assert fusion["metrics"]["headline"] == headline
    best = max(fusion["history"], key=lambda row: row[f"val_{headline}"])
    assert fusion["metrics"]["best_epoch"] == best["epoch"]
    config = json.loads((root / "models" / "fusion" / "config.json").read_text())
    assert config["target"]["type"] == kind and config["outputs"] == (1 if kind == "number" else 4)
    if kind == "set":  # the thresholds the model ships: tuned on validation scores of the saved weights, nothing else
        from mmpipe.training.model_io import load_model
        from mmpipe.training.train import score

        model = load_model(root / "models" / "fusion")
        val = FeatureSet(root / "features", split="val")
        untuned = model.target.fitted({**model.target.state, "thresholds": [0.5] * 4})
        expected = untuned.fit_on_val(score(model, val, model.modalities, torch.device("cpu"), target=untuned)["scores"],
                                      val.labels)
        assert config["target"]["state"]["thresholds"] == expected["thresholds"] == fusion["metrics"]["tuned_on_val"]["thresholds"]


def test_evaluate_speaks_the_targets_language(trained):
    metrics, tables = trained["eval"]["metrics"], trained["eval"]["tables"]
    kind = trained["kind"]
    headline = metrics["target"]["headline"]
    test = FeatureSet(trained["root"] / "features", split="test")
    assert metrics["test"]["samples"] == len(test)
    if kind == "number":
        assert {"mae", "rmse", "r2", "median_ape"} <= set(metrics["test"]) and "accuracy" not in metrics["test"]
        assert tables["truth"] == pytest.approx(test.target.decode(test.labels))
        assert tables["truth"] == pytest.approx(np.round(tables["truth"]), abs=1e-9)  # the digits' values, in their units
        assert set(np.round(tables["truth"])) <= set(range(10))
    else:
        assert {"f1_micro", "f1_macro", "map", "subset_accuracy"} <= set(metrics["test"])
        assert set(metrics["per_tag"]) == {"even", "prime", "loop", "large"}
        assert sum(t["support"] for t in metrics["per_tag"].values()) == int(test.labels.sum())
    assert set(metrics["missing"]["text"]) == {headline} and set(metrics["baselines"]["text"]) == {headline}
    assert metrics["fusion_gain"] == pytest.approx(metrics["test"][headline] - metrics["baselines"]["text"][headline])
    assert metrics["missing"]["+".join(names())][headline] == pytest.approx(metrics["test"][headline])


def test_compress_and_the_bundle_answer_in_the_targets_terms(trained, tmp_path):
    import subprocess
    import sys

    kind, checks, root = trained["kind"], trained["checks"], trained["root"]
    headline = {"number": "r2", "set": "f1_micro"}[kind]
    assert f"val_{headline}" in trained["compress"]["variants"]["int8"]
    assert checks["headline"] == headline and checks["fp32_onnx_vs_pytorch_max_abs_logit_diff"] < 1e-4
    # the predictor on the raw test files scores as evaluate did (the fp32 model; features equal bit for bit)
    assert checks[f"predictor_raw_test_{headline}_fp32"] == pytest.approx(checks[f"evaluate_test_{headline}"], abs=1e-6)
    assert checks["predictor_vs_pipeline_agreement_fp32"] == 1.0  # row by row: the same value, the same tags
    manifest = json.loads((root / "deploy" / "manifest.json").read_text())
    assert manifest["target"]["type"] == kind and manifest["output"]["shape"] == ["batch", 1 if kind == "number" else 4]
    card = (root / "deploy" / "MODEL_CARD.md").read_text()
    assert ("regression model" if kind == "number" else "4-tag multi-label model") in card
    out = subprocess.run([sys.executable, "predict.py", "--text", "looks like a 7"], cwd=root / "deploy",
                         capture_output=True, text=True)
    answer = json.loads(out.stdout)
    fitted = manifest["models"]["shipped"]["calibration"]
    # how far to trust it: the shipped model's sets/intervals, calibrated on val, hold the truth on test as promised
    # (a tiny test split: loosely), the predictor's on the raw files being the pipeline's on its features
    assert checks["alpha"] == 0.1 and checks["predictor_vs_pipeline_set_agreement"] == 1.0
    assert checks["predictor_raw_test_coverage"] == pytest.approx(checks["pipeline_test_coverage"], abs=1e-9)
    assert checks["predictor_raw_test_coverage"] >= 0.75
    if kind == "number":
        assert set(answer) == {"value", "interval", "alpha"} and isinstance(answer["value"], float)
        assert fitted["temperature"] is None and fitted["score"] == "abs_residual"
        low, high = answer["interval"]
        assert (low is None or low < answer["value"]) and (high is None or answer["value"] < high)
        if low is not None:  # the text-only pattern's threshold, around the prediction on the standardised scale
            state = manifest["target"]["state"]
            q = fitted["thresholds"]["0.1"]["text"]
            assert (high - low) == pytest.approx(2 * q * state["std"], rel=1e-6)  # transform none: symmetric
    else:
        assert set(answer) == {"tags", "scores", "prediction_set", "alpha"}
        assert set(answer["scores"]) == {"even", "prime", "loop", "large"}
        # the scores are temperature-scaled (the text-only pattern's T); the tags answered are still those of the
        # tuned thresholds: at the calibrated scale, sigmoid(logit(threshold) / T)
        t = fitted["temperature"]["patterns"]["text"]
        thresholds = {tag: 1 / (1 + math.exp(-math.log(thr / (1 - thr)) / t))
                      for tag, thr in zip(manifest["target"]["state"]["tags"], manifest["target"]["state"]["thresholds"])}
        assert answer["tags"] == [tag for tag, p in answer["scores"].items() if p >= thresholds[tag] - 1e-6]
        q = fitted["thresholds"]["0.1"]["text"]
        assert answer["prediction_set"] == [tag for tag, p in answer["scores"].items()
                                            if q is None or p >= 1 - q - 1e-6]


def test_the_mlflow_pyfunc_answers_rows_in_the_targets_columns(trained):
    from mmpipe.deploy import mlflow_model

    model = mlflow_model.BundleModel()
    model.load_context(type("Context", (), {"artifacts": {"bundle": str(trained["root"] / "deploy")}})())
    frame = pd.concat([trained["example"], pd.DataFrame([{"text": "\x00" * 3}])], ignore_index=True)
    out = model.predict(None, frame)
    if trained["kind"] == "number":
        assert list(out.columns) == ["value", "interval_low", "interval_high", "error"]
        assert isinstance(out.value[0], float) and out.error[0] == ""
    else:
        assert list(out.columns) == ["tags", "scores", "prediction_set", "error"]
        assert isinstance(json.loads(out.tags[0]), list) and isinstance(json.loads(out.prediction_set[0]), list)
    assert out.error[1] != ""  # a row it cannot read: its error, the others answered
