"""Cross-modal alignment (mmpipe/pretrain): retrieval metrics and search against brute force, the losses, the
pretrain loop on real features (unlabelled rows included), train starting from its encoders, and fewer labels."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from mmpipe import params
from mmpipe.errors import PipelineError
from mmpipe.deploy.verify import load_predictor, raw_test_items
from mmpipe.features.loader import FeatureSet
from mmpipe.modalities import names
from mmpipe.names import INDEX_FILE
from mmpipe.pretrain import align
from mmpipe.pretrain.retrieval import retrieval_metrics, search, true_match_ranks
from mmpipe.training.model_io import build_model, model_config
from mmpipe.training.train import labelled_share, train

SMALL = dict(dim=16, hidden=16, attention_heads=2, encoders={
    "image": {"width": 4}, "text": {"embed_dim": 8, "width": 8}, "audio": {"width": 4}, "tabular": {"width": 8}})


def brute_force_ranks(queries, gallery):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    return np.array([1 + sum(sims[i, j] >= sims[i, i] for j in range(len(g)) if j != i) for i in range(len(q))])


def test_ranks_and_recall_match_brute_force_and_ties_count_against_the_match():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 8))
    queries = gallery + rng.normal(scale=1.5, size=gallery.shape)  # noisy views of the same rows
    ranks = true_match_ranks(queries, gallery)
    assert np.array_equal(ranks, brute_force_ranks(queries, gallery))
    metrics = retrieval_metrics(queries, gallery)
    assert metrics["recall@5"] == pytest.approx(np.mean(ranks <= 5), abs=1e-4)
    assert metrics["median_rank"] == np.median(ranks) and metrics["chance@5"] == pytest.approx(5 / 300, abs=1e-4)
    assert metrics["recall@1"] > 10 * metrics["chance@1"]  # related views are found
    unrelated = retrieval_metrics(rng.normal(size=(300, 8)), gallery)
    assert unrelated["recall@10"] < 0.1 and 100 < unrelated["median_rank"] < 200
    constant = retrieval_metrics(np.ones((50, 4)), np.ones((50, 4)))  # a collapsed encoder is never credited
    assert constant["recall@10"] == 0.0 and constant["median_rank"] == 50
    assert retrieval_metrics(gallery, gallery)["recall@1"] == 1.0


def test_search_returns_the_most_similar_rows_best_first():
    rng = np.random.default_rng(1)
    index, queries = rng.normal(size=(2000, 16)), rng.normal(size=(3, 16))
    positions, scores = search(index, queries, k=7)
    unit = index / np.linalg.norm(index, axis=1, keepdims=True)
    for q, row, got in zip(queries, positions, scores):
        sims = unit @ (q / np.linalg.norm(q))
        assert list(row) == list(np.argsort(-sims, kind="stable")[:7])
        assert np.allclose(got, sims[row], atol=1e-5) and np.all(np.diff(got) <= 0)
    assert search(index[:4], queries, k=10)[0].shape == (3, 4)  # k capped at the index size


@pytest.mark.parametrize("kind", align.LOSSES)
def test_each_loss_prefers_matched_pairs(kind):
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    b = torch.nn.functional.normalize(a + 0.1 * torch.randn(32, 8), dim=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0 if kind == "siglip" else 0.0)
    matched = align.pair_loss(a, b, scale, bias, kind)
    shuffled = align.pair_loss(a, b[torch.randperm(32)], scale, bias, kind)
    assert matched < shuffled / 2


@pytest.fixture(scope="module")
def partly_unlabelled(tiny_corpus, tmp_path_factory):
    """The tiny corpus's features with a third of the train rows' targets removed (as a manifest's rows without
    one are): pretrain sees every row, train only the labelled."""
    root = tmp_path_factory.mktemp("partly_unlabelled") / "features"
    shutil.copytree(tiny_corpus / "features", root)
    for m in names():
        path = root / m / INDEX_FILE
        if not path.exists():
            continue
        table = pq.read_table(path)
        split, labels = table.column("split").to_pylist(), table.column("label").to_pylist()
        train_rows = [i for i, s in enumerate(split) if s == "train"]
        for i in train_rows[::3]:
            labels[i] = ""
        pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels)), path)
    return root


@pytest.fixture(scope="module")
def aligned(partly_unlabelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("aligned")
    cfg = params.PretrainParams(enabled=True, epochs=2, batch_size=32, device="cpu")
    rows = []
    result = align.pretrain(cfg, params.ModelParams(**SMALL), partly_unlabelled, out, lambda e, row: rows.append(row))
    return {"folder": out, "metrics": result["metrics"], "rows": rows, "features": partly_unlabelled}


def test_pretrain_aligns_on_every_row_and_writes_what_train_and_evaluate_load(aligned):
    metrics, folder = aligned["metrics"], aligned["folder"]
    labelled = FeatureSet(aligned["features"], split="train")
    everything = FeatureSet(aligned["features"], split="train", labelled=False)
    assert metrics["rows"]["train"] == len(everything) > len(labelled)
    assert metrics["rows"]["train_unlabelled"] == len(everything) - len(labelled) > 0
    modalities = list(FeatureSet(aligned["features"]).modalities)
    assert metrics["modalities"] == modalities and len(metrics["val"]) == len(modalities) * (len(modalities) - 1)
    assert [row["epoch"] for row in aligned["rows"]] == [0, 1] and all(np.isfinite(r["train_loss"]) for r in aligned["rows"])
    for pair in metrics["val"].values():
        assert pair["rows"] > 0 and 0 <= pair["recall@1"] <= pair["recall@5"] <= pair["recall@10"] <= 1

    model = align.load_aligned(folder)
    assert model.modalities == modalities and not model.training
    test = FeatureSet(aligned["features"], split="test", labelled=False)
    embedded = align.embed_split(model, test, torch.device("cpu"))
    assert all(np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4) for v in embedded.values())
    report = align.split_retrieval(folder, aligned["features"], "test", torch.device("cpu"))
    assert report["enabled"] and report["rows"] == len(test) and set(report["pairs"]) == set(metrics["val"])
    # the same inputs give the same embeddings (the retrieval figures are reproducible)
    again = align.split_retrieval(folder, aligned["features"], "test", torch.device("cpu"))
    assert again == report


def test_train_starts_from_the_aligned_encoders_and_refuses_mismatched_ones(aligned, tmp_path):
    features, folder = aligned["features"], aligned["folder"]
    data = FeatureSet(features)
    modalities = list(data.modalities)
    config = model_config(modalities, data.state, params.ModelParams(**SMALL).model_dump(), data.target)
    model = build_model(config)
    info = align.load_aligned_encoders(model, folder, modalities)
    saved = load_file(str(folder / align.ALIGNED_FILE))
    for name, value in model.encoders.state_dict().items():
        assert torch.equal(value, saved[f"encoders.{name}"]), name
    assert len(info["sha256"]) == 64 and info["modalities"] == modalities

    wider = model_config(modalities, data.state, params.ModelParams(**(SMALL | {"dim": 32})).model_dump(), data.target)
    with pytest.raises(PipelineError, match="re-run the pretrain stage"):
        align.load_aligned_encoders(build_model(wider), folder, modalities)
    off = tmp_path / "off"
    align.write_disabled(off)
    assert align.encoders_to_start_from("auto", off) is None and align.encoders_to_start_from("scratch", folder) is None
    assert align.encoders_to_start_from("auto", folder) == folder
    with pytest.raises(PipelineError, match="set pretrain.enabled: true, or model.init: scratch"):
        align.load_aligned_encoders(build_model(config), align.encoders_to_start_from("pretrained", off), modalities)
    assert align.load_aligned(off) is None
    assert align.split_retrieval(off, features, "test", torch.device("cpu")) == {"enabled": False}

    # train from them: one epoch, fewer labels; the metrics say where the encoders came from
    out = tmp_path / "fusion"
    result = train(params.TrainParams(epochs=1, batch_size=32, device="cpu", label_fraction=0.5),
                   params.ModelParams(**SMALL), features, modalities, out, None, aligned=folder)
    assert result["metrics"]["init"]["aligned"]["sha256"] == info["sha256"]
    assert result["metrics"]["labelled_rows"] == len(labelled_share(FeatureSet(features, split="train"), 0.5, 0))
    assert json.loads((out / "config.json").read_text())["modalities"] == modalities


def test_a_share_of_the_labels_keeps_every_class_in_proportion(tiny_corpus):
    data = FeatureSet(tiny_corpus / "features", split="train")
    positions = labelled_share(data, 0.25, seed=3)
    assert np.array_equal(positions, np.unique(positions))
    classes, counts = np.unique(data.labels, return_counts=True)
    kept = np.unique(data.labels[positions], return_counts=True)
    assert np.array_equal(kept[0], classes)  # every class, at least one row
    assert np.all(np.abs(kept[1] - counts * 0.25) <= 1)
    assert np.array_equal(labelled_share(data, 0.25, seed=3), positions)  # seeded
    assert not np.array_equal(labelled_share(data, 0.25, seed=4), positions)
    subset = FeatureSet(tiny_corpus / "features", split="train").select(positions)
    assert len(subset) == len(positions) and np.array_equal(subset.labels, data.labels[positions])
    assert np.array_equal(subset.available, data.available[positions])


def test_the_bundle_embeds_raw_files_indexes_a_collection_and_finds_the_matching_rows(bundle, tiny_corpus, tmp_path):
    """predict.py --embed / --index / --search on the raw test files, with only the bundle and its runtime
    dependencies (no torch, no mmpipe): the embeddings are the pipeline's, and a row's own recording is found
    among the recordings from its photo more often than chance."""
    from test_deploy import GUARD

    checks = bundle["checks"]["embed"]
    assert checks["shipped"] and checks["onnx_vs_pytorch_max_abs_diff"] < 1e-4
    assert checks["raw_test_min_cosine"] > 0.99 and checks["raw_test_vectors_compared"] > 0
    manifest = json.loads((bundle["folder"] / "manifest.json").read_text())
    assert manifest["embed"]["file"] == "embed.onnx" and "embed.onnx" in manifest["files"]
    assert "retrieval.py" in manifest["files"]

    test = FeatureSet(tiny_corpus / "features", split="test")
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, ["image", "text", "audio"])
    rows = []
    for i, item in enumerate(items):
        row = {"id": test.sample_ids[i], "image": "", "audio": "", "text": ""}
        if item["image"] is not None:
            (tmp_path / f"{i}.png").write_bytes(item["image"])
            row["image"] = f"{i}.png"
        if item["audio"] is not None:
            (tmp_path / f"{i}.wav").write_bytes(item["audio"])
            row["audio"] = f"{i}.wav"
        if item["text"] is not None:
            row["text"] = item["text"].decode()
        rows.append(row)
    with open(tmp_path / "collection.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "audio", "text"])
        writer.writeheader()
        writer.writerows(rows)

    def predict(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-I", "-c", GUARD, *args], cwd=bundle["folder"], capture_output=True,
                              text=True, timeout=300)

    both = next(i for i, r in enumerate(rows) if r["image"] and r["audio"])
    one = predict("--embed", "--image", str(tmp_path / rows[both]["image"]), "--audio", str(tmp_path / rows[both]["audio"]))
    assert one.returncode == 0, one.stderr
    answer = json.loads(one.stdout)
    assert set(answer["embeddings"]) == {"image", "audio"} and len(answer["fused"]) == manifest["embed"]["dim"]
    for vector in (*answer["embeddings"].values(), answer["fused"]):
        assert abs(np.linalg.norm(vector) - 1) < 1e-4

    index = tmp_path / "collection.npz"
    built = predict("--manifest", str(tmp_path / "collection.csv"), "--index", str(index))
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    assert summary["rows"] + summary["unreadable_rows"] == len(rows) and summary["rows"] > 0
    with np.load(index, allow_pickle=False) as saved:
        assert list(saved["modalities"]) == manifest["modalities"] and saved["vectors"].shape[0] == summary["rows"]

    # each photo as a query among the collection's recordings: the rank of its own row's recording
    queries = [i for i, r in enumerate(rows) if r["image"] and r["audio"]]
    with open(tmp_path / "photos.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image"])
        writer.writeheader()
        writer.writerows({"id": rows[i]["id"], "image": rows[i]["image"]} for i in queries)
    found = predict("--manifest", str(tmp_path / "photos.csv"), "--search", str(index), "--among", "audio", "--k", "5")
    assert found.returncode == 0, found.stderr
    answers = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(answers) == len(queries)
    recordings = sum(1 for r in rows if r["audio"])
    for answer in answers:
        assert len(answer["matches"]) == 5
        assert [m["similarity"] for m in answer["matches"]] == sorted((m["similarity"] for m in answer["matches"]),
                                                                      reverse=True)
    # the first answer against brute force over the saved index (the tiny model trains two epochs: its recall is
    # not asserted; the built-in corpus's is in docs/results.md)
    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
    query = predictor.embed([predictor.features(image=items[queries[0]]["image"])])[0]["fused"]
    with np.load(index, allow_pickle=False) as saved:
        audio = saved["modalities"].tolist().index("audio")
        have = np.flatnonzero(saved["available"][:, audio])
        assert len(have) == recordings
        sims = saved["vectors"][have, audio] @ np.array(query, np.float32)
        best = [str(saved["ids"][have[p]]) for p in np.argsort(-sims, kind="stable")[:5]]
    assert [m["id"] for m in answers[0]["matches"]] == best

    refused = predict("--text", "seven", "--search", str(index), "--among", "smell")
    assert refused.returncode == 2 and "--among smell: the index has" in refused.stdout
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not an index")
    broken = predict("--text", "seven", "--search", str(bad))
    assert broken.returncode == 2 and "not an index written by --index" in broken.stdout
    assert predict("--index", str(index), "--text", "seven").returncode == 2  # --index needs --manifest
