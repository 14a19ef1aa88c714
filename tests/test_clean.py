"""clean end to end on real files: the bad-input manifest, dedup, classes, splits, reproducibility."""

from __future__ import annotations

import json

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from conftest import png_bytes, tone, wav_bytes
from mmpipe.data import clean, collect


def read_parts(folder: Path) -> pd.DataFrame:
    return pd.DataFrame([r for p in sorted((folder / "samples").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()])


def collect_and_clean(tmp_path, source, data_params, clean_params, **clean_kw):
    raw, out = tmp_path / "raw", tmp_path / "clean"
    raw.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    collect.collect(data_params(source=str(source)), raw)
    metrics = clean.clean(clean_params(**clean_kw), raw, out)
    return metrics, read_parts(out), pq.read_table(out / "rejects.parquet").to_pandas()


@pytest.fixture
def bad_manifest(tmp_path):
    """The issue's bad-input manifest: every kind of bad item next to good ones."""
    files = tmp_path / "files"
    files.mkdir()
    good_png = png_bytes("RGB", seed=1)
    (files / "good.png").write_bytes(good_png)
    (files / "good2.png").write_bytes(png_bytes("L", seed=2))
    (files / "truncated.png").write_bytes(png_bytes("RGB", size=(64, 64), seed=3)[:300])
    (files / "good.wav").write_bytes(wav_bytes())
    (files / "stereo44k.wav").write_bytes(wav_bytes(tone(rate=44100, channels=2), rate=44100))
    (files / "zero.wav").write_bytes(b"")
    (files / "random.wav").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    rows = [
        {"id": "ok1", "label": "cat", "image": "files/good.png", "audio": "files/good.wav", "text": "a cat"},
        {"id": "ok2", "label": "cat", "image": "files/good2.png", "audio": "files/stereo44k.wav", "text": None},
        {"id": "trunc", "label": "cat", "image": "files/truncated.png", "audio": None, "text": "still has text"},
        {"id": "zero", "label": "dog", "image": "files/good.png", "audio": "files/zero.wav", "text": "dog one"},
        {"id": "rand", "label": "dog", "image": None, "audio": "files/random.wav", "text": "dog two"},
        {"id": "nopath", "label": "dog", "image": "files/does-not-exist.png", "audio": None, "text": "dog three"},
        {"id": "empty", "label": "dog", "image": "files/good2.png", "audio": None, "text": "   "},
        {"id": "spaces", "label": "dog  ", "image": None, "audio": "files/good.wav", "text": "dog four"},
        {"id": "dup", "label": "cat", "image": "files/good.png", "audio": "files/good.wav", "text": "a cat"},
        {"id": "onlybad", "label": "dog", "image": "files/truncated.png", "audio": "files/zero.wav", "text": None},
        {"id": "latin1", "label": "cat", "image": "files/good2.png", "audio": None, "text_file": "files/latin1.txt"},
        {"id": "utf8file", "label": "cat", "image": None, "audio": "files/stereo44k.wav", "text_file": "files/ok.txt"},
    ]
    (files / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (files / "ok.txt").write_bytes("na\u00efve cat".encode())
    path = tmp_path / "manifest.jsonl"
    pd.DataFrame(rows).to_json(path, orient="records", lines=True)
    return path


def test_bad_input_manifest(tmp_path, bad_manifest, data_params, clean_params):
    metrics, kept, rejects = collect_and_clean(tmp_path, bad_manifest, data_params, clean_params, min_per_class=1)
    kept = kept.set_index("sample_id")
    # every good item survives
    assert set(kept.index) == {"ok1", "ok2", "trunc", "zero", "rand", "nopath", "empty", "spaces", "latin1", "utf8file"}
    assert kept.loc["utf8file", "text"] == "na\u00efve cat" and not kept.loc["latin1", "text_available"]
    assert kept.loc["ok2", "audio_available"] and kept.loc["spaces", "label"] == "dog"
    assert kept.loc["trunc", "text"] == "still has text" and not kept.loc["trunc", "image_available"]
    assert kept.loc["zero", "image_available"] and not kept.loc["zero", "audio_available"]
    # every bad item is listed with its reason
    got = {(r.sample_id, r.modality, r.code) for r in rejects.itertuples()}
    assert got == {
        ("trunc", "image", "image_decode_error"),
        ("zero", "audio", "audio_empty"),
        ("rand", "audio", "audio_decode_error"),
        ("nopath", "image", "not_found"),
        ("empty", "text", "text_empty"),
        ("dup", "sample", "duplicate"),
        ("onlybad", "image", "image_decode_error"),
        ("onlybad", "audio", "audio_empty"),
        ("onlybad", "sample", "no_usable_modality"),
        ("latin1", "text", "text_not_utf8"),
    }
    by_id = rejects.groupby("sample_id").action.first()
    assert by_id["trunc"] == "modality_dropped" and by_id["dup"] == "sample_rejected"
    assert "does-not-exist.png" in rejects.set_index("sample_id").loc["nopath", "reason"]
    assert rejects.set_index("sample_id").loc["dup", "reason"] == "exact duplicate of sample ok1"
    assert "latin1.txt" in rejects.set_index("sample_id").loc["latin1", "ref"]
    assert metrics["samples_in"] == 12 and metrics["kept"] == 10 and metrics["rejected_samples"] == 2
    assert metrics["labels_stripped"] == 1
    assert metrics["rejects_by_code"]["image_decode_error"] == 2
    # converted audio is mono PCM16 at the target rate
    info = sf.info(io.BytesIO(kept.loc["ok2", "audio"]))
    assert (info.channels, info.samplerate, info.subtype) == (1, 16000, "PCM_16")


def test_non_utf8_text_file_in_folder(tmp_path, data_params, clean_params):
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "a" / "s1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "a" / "s1.png").write_bytes(png_bytes())
    (root / "a" / "s2.txt").write_bytes(b"")
    metrics, kept, rejects = collect_and_clean(tmp_path, root, data_params, clean_params, min_per_class=1)
    assert list(kept.sample_id) == ["a/s1"] and not kept.text_available[0]
    codes = dict(zip(rejects.sample_id + ":" + rejects.code, rejects.action))
    assert codes == {"a/s1:text_not_utf8": "modality_dropped", "a/s2:text_empty": "sample_rejected",
                     "a/s2:no_usable_modality": "sample_rejected"}


def test_drop_sample_policy(tmp_path, bad_manifest, data_params, clean_params):
    _, kept, rejects = collect_and_clean(tmp_path, bad_manifest, data_params, clean_params,
                                         min_per_class=1, on_bad_modality="drop_sample")
    assert set(kept.sample_id) == {"ok1", "ok2", "spaces", "utf8file"}
    assert (rejects[rejects.sample_id == "trunc"].action == "sample_rejected").all()


def write_manifest(tmp_path, rows, name="m.csv"):
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_min_per_class_and_a_missing_label_kept_unlabelled(tmp_path, data_params, clean_params):
    rows = [{"label": "big", "text": f"t{i}"} for i in range(6)] + [{"label": "tiny", "text": "x"},
                                                                    {"label": None, "text": "y"}]
    metrics, kept, rejects = collect_and_clean(tmp_path, write_manifest(tmp_path, rows), data_params, clean_params,
                                               min_per_class=5)
    assert sorted(kept.label) == [""] + ["big"] * 6  # "": kept without a target (a later pre-training can use it)
    assert sum(metrics["unlabelled"].values()) == 1 and list(metrics["per_class"]) == ["big"]
    assert sorted(rejects.code) == ["class_too_small"]
    assert "class 'tiny' has 1 samples < clean.min_per_class=5" in set(rejects.reason)
    dataset = json.loads((tmp_path / "clean" / "dataset.json").read_text())
    assert dataset["labels"] == ["big"] and dataset["target"]["state"] == {"labels": ["big"]}


def test_conflicting_labels_are_all_rejected(tmp_path, data_params, clean_params):
    rows = [{"label": "a", "text": "same"}, {"label": "b", "text": "same"}, {"label": "a", "text": "other"}]
    _, kept, rejects = collect_and_clean(tmp_path, write_manifest(tmp_path, rows), data_params, clean_params,
                                         min_per_class=1)
    assert list(kept.text) == ["other"]
    assert list(rejects.code) == ["conflicting_labels", "conflicting_labels"]


def test_duplicate_ids_with_different_content(tmp_path, data_params, clean_params):
    rows = [{"id": "s", "label": "a", "text": "one"}, {"id": "s", "label": "a", "text": "two"}]
    _, kept, rejects = collect_and_clean(tmp_path, write_manifest(tmp_path, rows), data_params, clean_params,
                                         min_per_class=1)
    assert list(kept.text) == ["one"] and list(rejects.code) == ["duplicate_id"]


def test_manifest_split_is_honoured_and_validated(tmp_path, data_params, clean_params):
    rows = [{"label": "a", "text": f"t{i}", "split": s} for i, s in enumerate(["test", "Validation", "bogus", None])]
    _, kept, rejects = collect_and_clean(tmp_path, write_manifest(tmp_path, rows), data_params, clean_params,
                                         min_per_class=1)
    assert list(kept.split[:2]) == ["test", "val"] and kept.split[2] in clean.SPLITS
    assert list(rejects.code) == ["split_invalid"] and "'bogus'" in rejects.reason[0]


def test_splits_are_stratified_in_expectation_and_stable_when_data_is_added(tmp_path, data_params, clean_params):
    fractions = clean_params().split
    ids = [f"s{i}" for i in range(3000)]
    splits = {i: clean.split_of(i, 0, fractions) for i in ids}
    counts = pd.Series(splits).value_counts(normalize=True)
    assert abs(counts["train"] - 0.7) < 0.03 and abs(counts["test"] - 0.15) < 0.03
    # adding rows (and reordering) changes no existing sample's split
    small = [{"id": i, "label": "ab"[n % 2], "text": i} for n, i in enumerate(ids[:200])]
    big = list(reversed(small + [{"id": f"new{i}", "label": "a", "text": f"new{i}"} for i in range(100)]))
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    _, kept_small, _ = collect_and_clean(tmp_path / "1", write_manifest(tmp_path, small, "a.csv"), data_params, clean_params)
    _, kept_big, _ = collect_and_clean(tmp_path / "2", write_manifest(tmp_path, big, "b.csv"), data_params, clean_params)
    before = dict(zip(kept_small.sample_id, kept_small.split))
    after = dict(zip(kept_big.sample_id, kept_big.split))
    assert all(after[i] == s for i, s in before.items())
    assert before == {i: splits[i] for i in before}


def test_groups_never_straddle_splits(tmp_path, data_params, clean_params):
    rows = [{"label": "a", "text": f"t{i}", "group": f"g{i % 7}"} for i in range(70)]
    _, kept, _ = collect_and_clean(tmp_path, write_manifest(tmp_path, rows), data_params, clean_params)
    assert (kept.groupby("group").split.nunique() == 1).all()


def test_builtin_collect_and_clean_is_byte_identical_on_rerun(tmp_path, data_params, clean_params):
    outputs = []
    for run in ("a", "b"):
        raw, out = tmp_path / run / "raw", tmp_path / run / "clean"
        raw.mkdir(parents=True)
        out.mkdir()
        collect.collect(data_params(n_samples=300, workers=2), raw)
        metrics = clean.clean(clean_params(workers=2, batch_rows=64), raw, out)
        outputs.append({p.relative_to(tmp_path / run): p.read_bytes()
                        for p in sorted((tmp_path / run).rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    assert metrics["kept"] == 300 and metrics["rejected_samples"] == 0
    kept = read_parts(tmp_path / "a" / "clean")
    assert (kept.groupby("group").split.nunique() == 1).all()
    assert kept[["image_available", "audio_available"]].any(axis=1).all()


def test_csv_cell_that_is_not_utf8_rejects_only_that_text(tmp_path, data_params, clean_params):
    path = tmp_path / "m.csv"
    path.write_bytes("label,text\nx,caf\xe9\nx,fine\n".encode("latin-1"))
    _, kept, rejects = collect_and_clean(tmp_path, path, data_params, clean_params, min_per_class=1)
    assert list(kept.text) == ["fine"]
    assert list(rejects.code) == ["text_not_utf8", "no_usable_modality"]
    assert "0xe9 at offset 3" in rejects.reason[0]


def test_both_text_and_text_file_is_a_conflict(tmp_path, data_params, clean_params):
    (tmp_path / "t.txt").write_text("from file")
    path = write_manifest(tmp_path, [{"label": "x", "text": "inline", "text_file": "t.txt"},
                                     {"label": "x", "text": None, "text_file": "t.txt"}])
    _, kept, rejects = collect_and_clean(tmp_path, path, data_params, clean_params, min_per_class=1)
    assert rejects.code[0] == "conflict" and "both 'text' and 'text_file'" in rejects.reason[0]
    assert list(kept.text) == ["from file"]


def validate_or_crash(rows, params):
    """clean's batch validation, except that an image holding b"CRASH" kills the worker process, as a
    decoder crashing in C (or the OS killing it) would."""
    import os

    if any(r.get("image") == b"CRASH" for r in rows):
        os._exit(139)
    return clean._validate_batch(rows, params)


@pytest.mark.slow
def test_a_decoder_crashing_its_worker_costs_only_that_item(tmp_path, clean_params):
    import pyarrow as pa

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = []
    for i in range(40):
        row = {"sample_id": f"s{i:02d}", "source_row": i, "label": "ab"[i % 2], "split": None, "group": None,
               "condition": None}
        for m in ("image", "text", "audio"):
            row.update({m: None, f"{m}_ref": None, f"{m}_error": None})
        row["image"], row["text"] = (b"CRASH" if i == 21 else png_bytes(seed=i)), f"text {i}".encode()
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows, schema=collect.raw_schema()), raw / "part-00000.parquet")
    cfg = clean_params(workers=2, batch_rows=4)
    results = [r for batch in clean._validated_batches(raw, cfg, validate=validate_or_crash) for r in batch]
    assert [r["row"]["sample_id"] for r in results] == [f"s{i:02d}" for i in range(40)]  # all, in order
    crashed = results[21]
    assert crashed["rejects"] == [{"sample_id": "s21", "source_row": 21, "modality": "image", "code": "decoder_crashed",
                                   "reason": "the image decoder crashed (killed its process) on this file", "ref": None,
                                   "action": "modality_dropped"}]
    assert crashed["row"]["text"] == "text 21" and not crashed["row"]["image_available"]
    assert all(r["row"]["image_available"] and not r["rejects"] for k, r in enumerate(results) if k != 21)


@pytest.mark.slow
def test_a_worker_dying_before_the_next_batch_is_submitted_costs_only_that_item(tmp_path, clean_params, monkeypatch):
    # the race behind a once-flaky run of the test above: the pool breaks while the reader is between
    # batches, so the next submit (not a result) is where BrokenProcessPool surfaces
    import time

    rows = [{"sample_id": f"s{i}", "source_row": i, "label": "ab"[i % 2], "split": None, "group": None,
             "condition": None, "image": b"CRASH" if i == 0 else png_bytes(seed=i), "text": f"text {i}".encode()}
            for i in range(6)]
    for row in rows:
        row.update({f"{m}_{k}": None for m in ("image", "text", "audio") for k in ("ref", "error")} | {"audio": None})

    def slow_batches(raw_dir, batch_rows):
        for start in range(0, len(rows), 2):
            yield rows[start:start + 2]
            time.sleep(3)  # time for the first batch to kill its worker
    monkeypatch.setattr(clean, "_raw_batches", slow_batches)
    results = [r for batch in clean._validated_batches(tmp_path, clean_params(workers=2), validate=validate_or_crash)
               for r in batch]
    assert [r["row"]["sample_id"] for r in results] == [f"s{i}" for i in range(6)]
    assert [r["rejects"][0]["code"] if r["rejects"] else None for r in results] == ["decoder_crashed"] + [None] * 5
