"""End to end: real `dvc repro` in a temporary copy of the repository, tiny profile."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import (DVC, TINY, dvc, free_port, pipeline_rows, png_bytes, ran_stages, runs, set_params, tone,
                      stage_env, wav_bytes)


def stage(repo: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=repo, env=stage_env(repo),
                          capture_output=True, text=True, timeout=600)


def snapshot(repo: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(repo)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted((repo / "data").rglob("*")) if p.is_file() and p.name != "source.json"}


def test_dvc_repro_clean_then_noop_then_only_changed_stage(repo):
    set_params(repo, **TINY)
    first = dvc(repo, "repro", "clean")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'collect'" in first.stdout and "Running stage 'clean'" in first.stdout

    raw = sorted((repo / "data/raw").glob("part-*.parquet"))
    clean = sorted((repo / "data/clean/samples").glob("part-*.parquet"))
    assert raw and clean and (repo / "data/clean/rejects.parquet").exists()
    kept = pq.read_table(clean[0])
    assert kept.num_rows == 200 and set(kept.column("split").to_pylist()) == {"train", "val", "test"}
    dataset = json.loads((repo / "data/clean/dataset.json").read_text())
    assert dataset["labels"] == [str(d) for d in range(10)] and dataset["clean_rules"]["audio"]["sample_rate"] == 16000
    collect_metrics = json.loads((repo / "metrics/collect.json").read_text())
    clean_metrics = json.loads((repo / "metrics/clean.json").read_text())
    assert collect_metrics["samples"] == 200 and clean_metrics["kept"] == 200

    table = runs(repo)
    assert list(table["tags.dvc.stage"]) == ["collect", "clean"]
    assert (table["status"] == "FINISHED").all()
    assert table["tags.pipeline.id"].nunique() == 1 and table["tags.git.commit"].str.len().eq(40).all()
    assert table["params.n_samples"][0] == "200" and table["params.min_per_class"][1] == "2"
    assert table["metrics.samples"][0] == 200 and table["metrics.kept"][1] == 200
    assert table["metrics.split.train"][1] == clean_metrics["split"]["train"]
    for i, m in enumerate((collect_metrics, clean_metrics)):  # each stage's own cost, in its file and its row
        assert 0 < m["process"]["wall_s"] < 600 and m["process"]["peak_rss_mb"] > 50, m["process"]
        assert table["metrics.process.wall_s"][i] == m["process"]["wall_s"]
    assert collect_metrics["process"]["written_mb"] > 0  # data/raw's parquet files

    lock = (repo / "dvc.lock").read_text()
    before = snapshot(repo)
    second = dvc(repo, "repro", "clean")
    assert second.returncode == 0, second.stderr
    assert "Stage 'collect' didn't change, skipping" in second.stdout
    assert "Stage 'clean' didn't change, skipping" in second.stdout
    assert (repo / "dvc.lock").read_text() == lock and snapshot(repo) == before
    assert len(runs(repo)) == 2  # nothing ran, nothing logged

    set_params(repo, clean={"split": {"train": 0.6, "val": 0.2, "test": 0.2}})
    status = dvc(repo, "status", "clean")
    assert "clean:" in status.stdout and "collect:" not in status.stdout
    third = dvc(repo, "repro", "clean")
    assert "Stage 'collect' didn't change, skipping" in third.stdout and "Running stage 'clean'" in third.stdout
    assert list(runs(repo)["tags.dvc.stage"]) == ["collect", "clean", "clean"]


def test_user_manifest_change_reruns_collect(repo, tmp_path):
    files = tmp_path / "mine"
    files.mkdir()
    (files / "a.png").write_bytes(png_bytes(seed=1))
    pd.DataFrame({"label": ["x", "x", "y", "y"], "image": ["a.png"] * 4,
                  "text": ["one", "two", "three", "four"]}).to_csv(files / "m.csv", index=False)
    set_params(repo, data={"source": str(files / "m.csv")}, clean={"min_per_class": 1})
    assert dvc(repo, "repro", "clean").returncode == 0
    assert "Stage 'collect' didn't change" in dvc(repo, "repro", "clean").stdout
    (files / "a.png").write_bytes(png_bytes(seed=2))  # same manifest, new image content
    again = dvc(repo, "repro", "clean")
    assert "Running stage 'collect'" in again.stdout, again.stdout


@pytest.mark.parametrize("change,expected", [
    ({"clean": {"min_per_class": -1}},
     "error: params.yaml: clean.min_per_class: Input should be greater than or equal to 1 (got -1)"),
    ({"clean": {"colour": "blue"}}, "error: params.yaml: clean.colour: unknown key"),
])
def test_bad_params_stop_the_stage_with_one_line(repo, change, expected):
    set_params(repo, **TINY)
    set_params(repo, **change)
    assert stage(repo, "collect").returncode == 0
    proc = stage(repo, "clean")
    assert proc.returncode == 2 and proc.stderr.strip() == expected
    assert not (repo / "data/clean").exists()  # stopped before any work


@pytest.mark.parametrize("manifest,expected", [
    ("nolabel.csv", "manifest has no 'label' column (data.target.column; columns: image, text)"),
    ("missing.csv", "data.source: {dir}/missing.csv does not exist"),
])
def test_collect_source_errors_are_one_line(repo, tmp_path, manifest, expected):
    pd.DataFrame({"image": ["a.png"], "text": ["t"]}).to_csv(tmp_path / "nolabel.csv", index=False)
    set_params(repo, data={"source": str(tmp_path / manifest)})
    proc = stage(repo, "collect")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("error: ") and expected.format(dir=tmp_path) in line
    assert not (repo / "data/raw").exists()


def test_queued_fusion_sweep_lands_as_one_mlflow_row_each_and_in_exp_show(repo):
    set_params(repo, **TINY)  # two whole pipelines at once: compress and export kept short (fp32 shipped, not registered)
    set_params(repo, compress={"prune": {"method": "none"}, "quantize": {"enabled": False}},
               export={"registered_model": None}, evaluate={"noise_levels": [0.0, 1.0]})
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "tiny"], cwd=repo, check=True)
    queued = dvc(repo, "exp", "run", "--queue", "-S", "model.fusion=concat,attention")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    # a fresh clone: two stages create the MLflow store at once. The daemonised workers inherit the
    # command's stdout, so it goes to a file: a pipe would stay open as long as a worker lives, and DVC's
    # celery worker sometimes misses its shutdown when the queue empties while its last task finishes
    with open(repo / "queue-start.log", "w") as log:
        started = subprocess.run([DVC, "queue", "start", "--jobs", "2"], cwd=repo, env=stage_env(repo),
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert started.returncode == 0, (repo / "queue-start.log").read_text()
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = dvc(repo, "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(5)
        assert status.count("Success") == 2, status + dvc(repo, "queue", "logs", status.split()[-2]).stdout
    finally:  # a worker that missed its shutdown must not outlive the test
        for info in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"):
            with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
                pid = int(json.loads(info.read_text())["pid"])
                if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still that worker, not a reused pid
                    os.kill(pid, signal.SIGTERM)

    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {exp["name"]: exp["data"] for commit in shown for exp in (commit.get("experiments") or [])
            for exp in exp["revs"]}
    fusions = {name: data["params"]["params.yaml"]["data"]["model"]["fusion"] for name, data in exps.items()}
    assert sorted(fusions.values()) == ["attention", "concat"]
    for data in exps.values():
        metrics = data["metrics"]
        assert 0 <= metrics["metrics/eval.json"]["data"]["test"]["accuracy"] <= 1
        assert metrics["metrics/compress.json"]["data"]["shipped"]["file_bytes"] > 0

    table = runs(repo)  # the store of the main checkout, not of .dvc/tmp/exps/<tmp>
    rows = pipeline_rows(repo).set_index("tags.dvc.exp_name")
    assert sorted(rows.index) == sorted(exps) and rows["status"].eq("FINISHED").all()
    assert dict(rows["params.model.fusion"]) == fusions
    for name in exps:  # each row's headline metrics are those its experiment shows in dvc exp show
        m = exps[name]["metrics"]
        assert rows.loc[name, "metrics.evaluate.test.accuracy"] == pytest.approx(
            m["metrics/eval.json"]["data"]["test"]["accuracy"])
        assert rows.loc[name, "metrics.compress.shipped.file_bytes"] == m["metrics/compress.json"]["data"]["shipped"]["file_bytes"]
        assert rows.loc[name, "metrics.export.predictor_raw_test_accuracy"] > 0
        assert rows.loc[name, "params.data.n_samples"] == "200"
        children = table[table["tags.mlflow.parentRunId"] == rows.loc[name, "run_id"]]
        assert {"train", "evaluate", "compress", "export"} <= set(children["tags.mmpipe.stage"])
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))


def test_changing_one_modality_param_reruns_only_that_preprocess(repo):
    set_params(repo, **TINY)
    full = dvc(repo, "repro", "preprocess")  # the features: the stages after them are covered by the gate test
    assert full.returncode == 0, full.stdout + full.stderr
    for m in ("image", "text", "audio"):
        assert f"Running stage 'preprocess@{m}'" in full.stdout
        assert (repo / "data/features" / m / "index.parquet").exists()
        assert json.loads((repo / f"metrics/preprocess_{m}.json").read_text())["samples"] == 200
    assert set(runs(repo)["tags.dvc.stage"]) >= {"preprocess@image", "preprocess@text", "preprocess@audio"}
    set_params(repo, preprocess={"audio": {"n_mels": 32}})
    status = dvc(repo, "status").stdout
    assert "preprocess@audio:" in status
    assert "preprocess@image:" not in status and "preprocess@text:" not in status and "clean:" not in status
    again = dvc(repo, "repro", "preprocess")
    assert "Running stage 'preprocess@audio'" in again.stdout
    assert "Stage 'preprocess@image' didn't change, skipping" in again.stdout
    assert "train:" in dvc(repo, "status", "train").stdout  # downstream of the changed features
    state = json.loads((repo / "data/features/audio/state.json").read_text())
    assert state["n_mels"] == 32 and len(state["mean"]) == 32


def test_torchrun_two_nodes_rendezvous_over_c10d_and_train_like_one_process(repo):
    # default model; enough samples and steps that the tiny run learns (well above the 10 % of chance)
    set_params(repo, data={**TINY["data"], "n_samples": 600}, clean=TINY["clean"],
               train={"epochs": 8, "batch_size": 32, "baselines": False})
    single = dvc(repo, "repro", "train")
    assert single.returncode == 0, single.stdout + single.stderr
    one = json.loads((repo / "metrics/train.json").read_text())["fusion"]
    n_runs = len(runs(repo))

    # two "nodes" as a multi-node launch starts them (README "Several machines"): one torchrun per node,
    # meeting at node 0's c10d rendezvous endpoint, one process each
    endpoint = f"127.0.0.1:{free_port()}"
    logs = [repo.parent / f"node{node}.log" for node in (0, 1)]
    nodes = [subprocess.Popen(
        [str(Path(sys.executable).parent / "torchrun"), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint={endpoint}", "--rdzv-id=mmpipe-test",
         f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120", "-m", "stages.train"],
        cwd=repo, env=stage_env(repo), stdout=log.open("w"), stderr=subprocess.STDOUT)
        for node, log in enumerate(logs)]
    for node in nodes:
        node.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    ddp = subprocess.CompletedProcess([], 0, stdout="".join(outputs))
    two = json.loads((repo / "metrics/train.json").read_text())["fusion"]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["val_accuracy"] > 0.35 and abs(two["val_accuracy"] - one["val_accuracy"]) <= 0.15, (one, two)
    assert ddp.stdout.count("train[fusion]: val accuracy") == 1  # rank 0 alone reports ...
    table = runs(repo)
    assert len(table) == n_runs + 1 and table["tags.dvc.stage"].iloc[-1] == "train"  # ... and logs
    assert not list((repo / ".checkpoints").rglob("*.pt"))


def test_partitioned_preprocessing_joins_into_the_single_run_bytes(repo):
    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    set_params(repo, data=TINY["data"], clean=TINY["clean"], preprocess={"shard_rows": 48})  # 200 samples: 5 shards
    single_run = dvc(repo, "repro", "preprocess")
    assert single_run.returncode == 0, single_run.stdout + single_run.stderr
    assert not any(s.startswith("preprocess-part") for s in ran_stages(single_run))
    single = files(repo / "data/features")

    set_params(repo, preprocess={"partitions": [0, 1, 2]})
    partitioned = dvc(repo, "repro", "preprocess")
    assert partitioned.returncode == 0, partitioned.stdout + partitioned.stderr
    modalities = ["image", "text", "audio", "tabular"]
    assert {f"preprocess-part@{m}-{k}" for m in modalities for k in range(3)} | {f"preprocess@{m}" for m in modalities} \
        == set(ran_stages(partitioned)) - {"source"}  # source: always runs (cheap fingerprint)
    assert files(repo / "data/features") == single  # index, state, fitted files and every shard, byte for byte
    for m in modalities:  # each partition holds its own shards: their union is the single run's, each once
        union: dict[str, bytes] = {}
        for k in range(3):
            shards = {p.name: p.read_bytes() for p in (repo / f"data/partitions/{m}/{k}").glob("*.npy")}
            assert not union.keys() & shards.keys()
            union |= shards
        assert union == {name.split("/")[1]: b for name, b in single.items()
                         if re.fullmatch(rf"{m}/[\w.]+-\d{{5}}\.npy", name)}  # the shard files
    assert [json.loads((repo / f"data/partitions/audio/{k}/part.json").read_text())["shards"] for k in range(3)] \
        == [[0, 1], [1, 3], [3, 5]]
    assert json.loads((repo / "metrics/preprocess_audio.json").read_text())["partitions"] == 3

    again = dvc(repo, "repro", "preprocess")
    assert again.returncode == 0 and ran_stages(again) == ["source"]


def test_a_number_then_a_tag_set_from_a_users_manifest_through_dvc_repro_to_the_bundle(repo, tmp_path):
    """A listings manifest (224 px photos, 5 s 44.1 kHz stereo recordings, a title, metadata columns, a
    price and a tag column): with only data.source and data.target set (plus the tiny model), the image
    size and clip length follow the data (auto, recorded in the metrics), and `dvc repro` runs to a bundle
    that answers values on the raw files as evaluate scored them; declaring the tag column instead re-runs
    from collect and clean reads tag sets."""
    files = tmp_path / "listings"
    files.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(72):
        size, color = int(rng.integers(1, 10)), ["red", "blue", "green"][i % 3]
        (files / f"{i}.jpg").write_bytes(png_bytes(size=(224 + 16 * (i % 3), 224), seed=i, fmt="JPEG", quality=80))
        clip = tone(seconds=4.6 + 0.1 * (i % 5), rate=44100, channels=2, freq=200.0 + 60 * size)
        (files / f"{i}.wav").write_bytes(wav_bytes(clip, rate=44100))
        rows.append({"id": f"l{i}", "image": f"{i}.jpg", "audio": f"{i}.wav", "text": f"{color} item of size {size}",
                     "size": size,
                     "color": color, "price": round(20.0 * size + rng.normal(0, 3), 2),
                     "tags": ";".join([t for t, on in (("big", size > 5), ("red", color == "red")) if on])})
    rows[3]["price"], rows[4]["price"], rows[5]["price"] = None, None, "n/a"  # two unlabelled rows, one bad cell
    pd.DataFrame(rows).to_csv(files / "listings.csv", index=False)
    set_params(repo, **{k: v for k, v in TINY.items() if k != "data"})
    set_params(repo, evaluate={"gates": {"min_accuracy": 0.9}})  # params.yaml's bar for classes: said, not checked
    # (kept short: int8 and pruning of every target type are in test_targets; no registry, the pyfunc is asked directly)
    set_params(repo, compress={"prune": {"method": "none"}}, export={"registered_model": None})
    set_params(repo, data={"source": str(files / "listings.csv"), "tabular": {"columns": "auto"},
                           "target": {"column": "price", "type": "number"}})
    run = dvc(repo, "repro")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "clean: 2 samples have no target: kept unlabelled" in run.stdout
    # what a user's photos and recordings are cut to, chosen from the train split and said so
    image_auto = json.loads((repo / "metrics/preprocess_image.json").read_text())["auto"]["size"]
    audio_auto = json.loads((repo / "metrics/preprocess_audio.json").read_text())["auto"]["seconds"]
    assert image_auto["value"] == 64 and "median short side" in image_auto["why"] and "224 px" in image_auto["why"]
    assert audio_auto["value"] == 5.0 and "99th-percentile duration" in audio_auto["why"]
    assert "preprocess audio: seconds: auto -> 5.0 (" in run.stdout
    assert json.loads((repo / "data/features/audio/state.json").read_text())["seconds"] == 5.0
    cleaned = json.loads((repo / "metrics/clean.json").read_text())
    assert cleaned["rejects_by_code"] == {"target_not_a_number": 1} and sum(cleaned["unlabelled"].values()) == 2
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluated["target"]["headline"] == "r2" and {"r2", "rmse", "mae"} <= set(evaluated["test"])
    assert evaluated["gates"]["passed"] and evaluated["gates"]["checked"] == {}
    assert evaluated["gates"]["not_applicable"][0].startswith("evaluate.gates.min_accuracy: this number target has no")
    assert (repo / "plots/eval/predictions.csv").exists() and not (repo / "plots/eval/confusion.csv").exists()
    exported = json.loads((repo / "metrics/export.json").read_text())
    assert exported["passed"] and exported["predictor_raw_test_r2_fp32"] == pytest.approx(exported["evaluate_test_r2"],
                                                                                           abs=1e-6)
    answers = subprocess.run([sys.executable, "artifacts/deploy/predict.py", "--manifest", str(files / "listings.csv")],
                             cwd=repo, capture_output=True, text=True)
    values = [json.loads(line) for line in answers.stdout.splitlines()]
    assert len(values) == 72 and all(isinstance(v["value"], float) for v in values)
    # each price with its conformal interval (alpha 0.1) in dollars, around the answer
    assert all(v["alpha"] == 0.1 and (v["interval"][0] is None or v["interval"][0] <= v["value"])
               and (v["interval"][1] is None or v["value"] <= v["interval"][1]) for v in values)
    assert "regression model" in (repo / "artifacts/deploy/MODEL_CARD.md").read_text()
    from mmpipe.deploy import mlflow_model  # what `mlflow models serve` answers a REST request with

    served = mlflow_model.BundleModel()
    served.load_context(type("Context", (), {"artifacts": {"bundle": str(repo / "artifacts/deploy")}})())
    out = served.predict(None, pd.DataFrame([{"text": "red item of size 3", "size": "3", "color": "red"}, {"size": "?"}]))
    assert list(out.columns) == ["value", "interval_low", "interval_high", "error"]
    assert isinstance(out.value[0], float) and out.error[0] == ""
    assert out.value[1] is None and out.interval_low[1] is None and "no usable input" in out.error[1]

    # the tag column instead: collect re-runs, clean parses the tags (through the bundle: test_targets, in-process)
    set_params(repo, data={"target": {"column": "tags", "type": "set"}})
    again = dvc(repo, "repro", "clean")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "Running stage 'collect'" in again.stdout
    dataset = json.loads((repo / "data/clean/dataset.json").read_text())
    assert dataset["target"]["state"]["tags"] == ["big", "red"] and "unlabelled" not in dataset  # "": no tags
    tabular = dataset["clean_rules"]["tabular"]["columns"]
    assert "price" in tabular and "tags" not in tabular  # the target never an input; the other column may be
