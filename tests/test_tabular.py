"""The tabular modality on the data users bring: manifest columns declared or `auto`, JSON records in
folders, bad cells made missing and listed, features fitted on train only, corruptions, and the
bundle's predictor taking a record (`--tabular '{...}'`, manifest columns) as the pipeline does."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmpipe import params
from mmpipe.data.clean import clean
from mmpipe.names import DATASET_FILE, REJECTS_FILE, STATE_FILE
from mmpipe.data.collect import collect
from mmpipe.deploy.verify import load_predictor
from mmpipe.modalities import names, records, tabular


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def run_data(tmp_path: Path, source: Path, columns, min_per_class: int = 1) -> Path:
    root = tmp_path / "run"
    for folder in ("raw", "clean", *(f"features/{m}" for m in names())):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"source": str(source), "tabular": {"columns": columns}}), root / "raw")
    clean(params.validate("clean", {"workers": 1, "min_per_class": min_per_class}), root / "raw", root / "clean")
    return root


def clean_rows(root: Path) -> dict[str, dict]:
    frame = pd.read_parquet(root / "clean" / "samples")
    return {row["sample_id"]: row for row in frame.to_dict(orient="records")}


def test_declared_columns_are_gathered_coerced_and_bad_cells_listed_with_their_column(tmp_path, capsys):
    source = write_csv(tmp_path / "m.csv", ["id", "label", "text", "age", "country", "notes"], [
        ["a", "x", "one", "31", "FR", "n1"],
        ["b", "x", "two", "abc", "DE", "n2"],      # a word in a numeric column: that cell made missing
        ["c", "y", "three", "", "", "n3"],         # no cell: tabular absent (not a reject)
        ["d", "y", "", "nan?", "", "n4"],          # only a bad cell: tabular rejected, and so the sample
        ["e", "y", "five", " 4.5e1 ", " Côte  d'Ivoire ", "n5"],
    ])
    root = run_data(tmp_path, source, {"age": "numeric", "country": "categorical"})
    assert "ignoring manifest columns not used by the pipeline: notes" in capsys.readouterr().out
    rows = clean_rows(root)
    assert json.loads(rows["a"]["tabular"]) == {"age": 31.0, "country": "FR"} and rows["a"]["tabular_cells"] == 2
    assert json.loads(rows["b"]["tabular"]) == {"country": "DE"}
    assert pd.isna(rows["c"]["tabular"]) and not rows["c"]["tabular_available"]
    assert json.loads(rows["e"]["tabular"]) == {"age": 45.0, "country": "Côte d'Ivoire"}
    assert "d" not in rows
    rejects = pd.read_parquet(root / "clean" / REJECTS_FILE)
    by_id = {sid: group.to_dict(orient="records") for sid, group in rejects.groupby("sample_id")}
    assert [(r["code"], r["action"]) for r in by_id["b"]] == [("tabular_bad_cell", "value_dropped")]
    assert by_id["b"][0]["reason"] == "column 'age': \"abc\" is not a finite number (made missing)"
    assert {r["code"] for r in by_id["d"]} == {"tabular_empty", "no_usable_modality"}
    assert "column 'age': \"nan?\" is not a finite number" in next(r["reason"] for r in by_id["d"] if r["code"] == "tabular_empty")
    dataset = json.loads((root / "clean" / DATASET_FILE).read_text())
    assert dataset["clean_rules"]["tabular"]["columns"] == {"age": "numeric", "country": "categorical"}


def test_auto_gathers_unused_columns_and_types_them_by_rule(tmp_path):
    rng = np.random.default_rng(0)
    body = [[f"s{i}", "ab"[i % 2], f"{150 + i * 0.7 + rng.normal(0, 5):.2f}" if i != 7 else "tall",
             rng.choice(["red", "blue"]), str(i % 3)] for i in range(40)]
    source = write_csv(tmp_path / "m.csv", ["id", "label", "height", "colour", "grade"], body)
    root = run_data(tmp_path, source, "auto")
    dataset = json.loads((root / "clean" / DATASET_FILE).read_text())
    # one word in 40 numbers (2.5 % < 5 %): still numeric, that cell listed; digits-only "grade" is numeric
    assert dataset["clean_rules"]["tabular"]["columns"] == {"colour": "categorical", "grade": "numeric", "height": "numeric"}
    rejects = pd.read_parquet(root / "clean" / REJECTS_FILE)
    assert rejects.code.tolist() == ["tabular_bad_cell"] and rejects.sample_id.tolist() == ["s7"]
    assert records.auto_types([{"h": "1"}, {"h": "x"}], 10) == {"h": "categorical"}  # 50 % numbers: categorical


def test_folder_json_records_and_a_manifest_record_cell(tmp_path):
    for label, stem, record in (("x", "s1", {"age": 30, "city": "Lyon"}), ("y", "s2", {"age": 50, "city": "Oslo"}),
                                ("y", "s3", {"age": None, "city": ["not", "a", "value"]})):
        (tmp_path / "f" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / label / f"{stem}.json").write_text(json.dumps(record))
        (tmp_path / "f" / label / f"{stem}.txt").write_text(f"sample {stem}")
    root = run_data(tmp_path, tmp_path / "f", {})
    rows = clean_rows(root)
    assert json.loads(rows["x/s1"]["tabular"]) == {"age": 30.0, "city": "Lyon"}
    assert not rows["y/s3"]["tabular_available"] and rows["y/s3"]["text_available"]
    reason = pd.read_parquet(root / "clean" / REJECTS_FILE).reason.tolist()[0]
    assert reason.startswith("no tabular column has a usable value (column 'city': [\"not\", \"a\", \"value\"] (a nested value) is not a text")

    conflict = write_csv(tmp_path / "c.csv", ["label", "tabular", "age"], [["x", '{"age": 3}', "4"], ["x", '{"age": 3}', ""]])
    root = run_data(tmp_path / "c", conflict, {"age": "numeric"})
    rejects = pd.read_parquet(root / "clean" / REJECTS_FILE)
    assert rejects.code.tolist()[0] == "conflict" and "both 'tabular' and its columns age" in rejects.reason.tolist()[0]


def test_features_are_fitted_on_train_only_robustly_with_unk_and_missing_flags(tmp_path):
    cfg = params.validate("preprocess", {}).tabular
    dataset = {"clean_rules": {"tabular": {"columns": {"age": "numeric", "city": "categorical"}}}}
    features = tabular.Features(cfg, dataset)
    train = [{"age": float(a), "city": c} for a, c in zip(range(20, 40), ["Lyon"] * 12 + ["Oslo"] * 6 + ["Rome"] * 2)]
    features.fit([json.dumps(r) for r in train] + [json.dumps({"age": 1e9})])  # one outlier: median/IQR barely move
    state = features.state()
    age, city = state["columns"]
    assert age["median"] == pytest.approx(29.5, abs=0.6) and age["scale"] == pytest.approx(9.5 / 1.349, rel=0.1)
    assert city["categories"] == ["Lyon", "Oslo"]  # Rome seen twice < min_count 5
    out = features.transform([json.dumps({"age": 29.5, "city": "Oslo"}), json.dumps({"city": "Rome"}),
                              json.dumps({"age": 1e12, "city": "Paris"}), None], ["a", "b", "c", "d"], errors={})
    numeric, categories = out[tabular.NUMERIC], out[tabular.CATEGORIES]
    assert numeric.shape == (4, 2) and categories.shape == (4, 1) and list(features.arrays) == [tabular.NUMERIC, tabular.CATEGORIES]
    assert numeric[0].tolist() == pytest.approx([0.0, 0.0], abs=0.1) and numeric[1].tolist() == [0.0, 1.0]
    assert numeric[2, 0] == cfg.clip  # clipped
    assert categories[:, 0].tolist() == [3, records.UNKNOWN_ID, records.UNKNOWN_ID, records.MISSING_ID]  # Oslo, Rome, Paris
    again = tabular.Features.from_state(tmp_path, state)
    assert all(np.array_equal(again.transform([json.dumps({"city": "Rome"})], ["b"], errors={})[k], out[k][1:2]) for k in out)


def test_corruptions_touch_only_present_cells_and_scale_with_level():
    rng = np.random.default_rng(0)
    numeric = np.zeros((200, 4), np.float32)
    numeric[:100, 3] = 1.0  # column 1 missing on half the rows
    cells = tabular.Cells(numeric, np.full((200, 1), 3, np.int32), [5])
    assert np.array_equal(tabular.numeric_noise(cells, 0.0, rng).numeric, numeric)
    noisy = tabular.numeric_noise(tabular.Cells(numeric, cells.categories, [5]), 1.0, rng).numeric
    assert (noisy[:100, 1] == 0).all() and noisy[:, 0].std() == pytest.approx(2.0, rel=0.2)
    swapped = tabular.category_swaps(tabular.Cells(numeric, cells.categories, [5]), 1.0, rng).categories
    assert swapped.min() >= records.UNKNOWN_ID and swapped.max() < 5 and (swapped != 3).mean() > 0.6
    masked = tabular.masking(tabular.Cells(numeric, cells.categories, [5]), 1.0, rng)
    assert (masked.numeric[:, 2:] == 1).all() and (masked.numeric[:, :2] == 0).all() and (masked.categories == 0).all()


def test_bundle_predictor_takes_a_record_as_the_pipeline_featurised_it(bundle, tiny_corpus):
    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
    columns = predictor.request_columns()
    state = json.loads((tiny_corpus / "features" / "tabular" / STATE_FILE).read_text())
    record_columns = [c["name"] for c in state["columns"]]
    assert [c for c, (m, _) in columns.items() if m == "tabular"] == record_columns
    frame = pd.read_parquet(tiny_corpus / "clean" / "samples")
    test = frame[(frame.split == "test") & frame.tabular_available].iloc[0]
    pipeline = tabular.Features.from_state(tiny_corpus / "features" / "tabular", state).transform([test.tabular], ["t"], errors={})
    as_text = {k: str(v) for k, v in json.loads(test.tabular).items()}  # as a CSV or a form sends it
    served = predictor.features(tabular=as_text)
    for name, values in pipeline.items():
        assert np.array_equal(served[name], values[0].astype(served[name].dtype)), name
    assert served["available"].tolist() == [m == "tabular" for m in predictor.modalities]
    with pytest.raises(predictor.InputError, match="no usable input"):
        predictor.features(tabular={record_columns[0]: ""})


def test_predict_cli_takes_tabular_json_and_manifest_columns(bundle, tmp_path):
    folder = bundle["folder"]
    manifest = json.loads((folder / "manifest.json").read_text())
    numeric = next(c for c, t in manifest["clean"]["tabular"]["columns"].items() if t == "numeric")
    categorical = next(c for c, t in manifest["clean"]["tabular"]["columns"].items() if t == "categorical")
    record = json.dumps({numeric: 31, categorical: "odd"})
    one = subprocess.run([sys.executable, "predict.py", "--tabular", record, "--text", "seven"], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["label"] in manifest["labels"]
    bad = subprocess.run([sys.executable, "predict.py", "--tabular", "[1, 2]"], cwd=folder, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "expected a JSON object, got list" in bad.stdout + bad.stderr
    write_csv(tmp_path / "m.csv", ["id", "text", numeric, categorical], [["a", "seven", "31", "odd"], ["b", "", "", ""],
                                                                          ["c", "", "not a number", "even"]])
    rows = subprocess.run([sys.executable, "predict.py", "--manifest", str(tmp_path / "m.csv")], cwd=folder,
                          capture_output=True, text=True, timeout=120)
    assert rows.returncode == 1, rows.stderr  # a row had an error
    results = [json.loads(line) for line in rows.stdout.splitlines()]
    assert [r["id"] for r in results] == ["a", "b", "c"]
    assert results[0]["label"] and results[1]["error"].startswith("no input") and results[2]["label"]  # bad cell: missing


# Values that reach typing from users' records, as JSON text: each must end as a bad cell (or the
# record as a reject) with its reason, never as an exception out of clean or the predictor.
HOSTILE_CELLS = {"int_400_digits": "1" + "0" * 400, "int_5000_digits": "9" * 5000, "float_1e400": "1e400",
                 "infinity": "Infinity", "minus_infinity": "-Infinity", "nan": "NaN", "object": '{"a": {"b": 1}}',
                 "array": "[1, [2, 3]]", "deep": "[" * 40 + "]" * 40, "true": "true"}


def test_hostile_cells_are_bad_cells_at_clean_with_default_params(tmp_path):
    """Default params: the columns are typed by auto_types over every record (where a 400-digit integer
    raised OverflowError and killed the stage)."""
    folder = tmp_path / "f"
    for label in ("x", "y"):
        (folder / label).mkdir(parents=True)
    for i in range(200):  # enough ordinary numbers that 'age' stays numeric (>= 95 % numbers)
        (folder / "xy"[i % 2] / f"s{i}.json").write_text(json.dumps({"age": 20 + i % 50, "city": "Lyon" if i % 3 else "Oslo"}))
    for name, cell in HOSTILE_CELLS.items():  # the same value in the numeric and in the categorical column
        (folder / "x" / f"h_{name}.json").write_text(f'{{"age": {cell}, "city": {cell}, "note": "kept"}}')
    (folder / "y" / "h_10mb.json").write_text(json.dumps({"age": 1, "city": "x" * 10_000_000}))
    root = run_data(tmp_path, folder, {})
    rows = clean_rows(root)
    rejects = pd.read_parquet(root / "clean" / REJECTS_FILE)
    rules = json.loads((root / "clean" / DATASET_FILE).read_text())["clean_rules"]["tabular"]["columns"]
    assert rules == {"age": "numeric", "city": "categorical", "note": "categorical"}
    for name in HOSTILE_CELLS:
        sid = f"x/h_{name}"
        mine = rejects[rejects.sample_id == sid]
        reasons = mine.reason.tolist()
        if name == "true":  # a boolean is a category, not a number
            assert json.loads(rows[sid]["tabular"]) == {"city": "true", "note": "kept"}
            assert reasons == ["column 'age': true is not a finite number (made missing)"]
            continue
        assert json.loads(rows[sid]["tabular"]) == {"note": "kept"}, name  # the rest of the record is kept
        assert mine.action.tolist() == ["value_dropped"] * 2 and mine.code.tolist() == ["tabular_bad_cell"] * 2, name
        assert [r.split(":")[0] for r in reasons] == ["column 'age'", "column 'city'"], name
        assert all(len(r) < 200 and "\n" not in r and "(made missing)" in r for r in reasons), reasons
    assert "too large for a float" in rejects[rejects.sample_id == "x/h_int_400_digits"].reason.tolist()[0]
    assert "(not finite)" in rejects[rejects.sample_id == "x/h_nan"].reason.tolist()[0]
    assert "(a nested value)" in rejects[rejects.sample_id == "x/h_object"].reason.tolist()[1]
    big = rejects[rejects.sample_id == "y/h_10mb"]
    assert big.code.tolist()[0] == "tabular_too_large" and big.reason.tolist()[0].startswith("tabular record is 10,000,")


def test_hostile_cells_are_bad_cells_at_serve_time_and_columns_meet_the_record_byte_limit(bundle, tmp_path):
    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
    rules = predictor.rules["tabular"]
    numeric = next(c for c, t in rules["columns"].items() if t == "numeric")
    categorical = next(c for c, t in rules["columns"].items() if t == "categorical")
    for name, cell in HOSTILE_CELLS.items():
        value = json.loads(f"[{cell}]", parse_int=lambda s: int(s) if len(s) < 4000 else float(s))[0]
        for column, other in ((numeric, {categorical: "Lyon"}), (categorical, {numeric: 1.0})):
            if column == categorical and name == "true":
                continue  # a boolean is a category
            _, dropped = records.decode_record({column: value, **other}, rules)  # the pipeline's verdict
            assert [code for code, _ in dropped] == ["tabular_bad_cell"], name
            served = predictor.features(tabular={column: value, **other})  # as the REST adapter hands a row over
            without = predictor.features(tabular=other)  # the bad cell is a missing cell, as at clean
            assert all(np.array_equal(served[k], without[k]) for k in served), (name, column)
    # cells that arrive as columns are held to clean.tabular.max_bytes, as a JSON record is
    with pytest.raises(predictor.InputError, match=r"tabular record is 70,0\d\d bytes > clean.tabular.max_bytes=65,536"):
        predictor.features(tabular={categorical: "x" * 70_000})
    write_csv(tmp_path / "m.csv", ["id", categorical, "text"], [["big", "y" * 70_000, "seven"], ["ok", "y", "seven"]])
    proc = subprocess.run([sys.executable, "predict.py", "--manifest", str(tmp_path / "m.csv")], cwd=bundle["folder"],
                          capture_output=True, text=True, timeout=120)
    big, ok = (json.loads(line) for line in proc.stdout.splitlines())
    assert "clean.tabular.max_bytes" in big["error"] and ok["label"]
