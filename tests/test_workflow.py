"""The workflow on one real tiny pipeline: a quality gate stopping `dvc repro`, MLflow rows per
execution, incremental re-runs, the MLflow server's REST API, the notebooks, and CI's run-cache
restore in a fresh clone.

The tests share one repository (module fixture: a `dvc repro` stopped by an unreachable gate, then
a passing one) and run in file order; each leaves it in a state the next builds on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from conftest import (ROOT, TINY, all_runs, copy_repo, dvc, free_port, git_commit, git_init, http_server, pipeline_rows,
                      ran_stages, runs, set_params, stage_env)
from mmpipe.tracking import summary
from mmpipe.io import flatten

STAGES = ["collect", "clean", "preprocess@image", "preprocess@text", "preprocess@audio", "preprocess@tabular", "pretrain",
          "train", "evaluate", "compress", "export"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    repo = git_init(copy_repo(tmp_path_factory.mktemp("workflow") / "repo"))
    set_params(repo, **TINY)
    set_params(repo, evaluate={"gates": {"min_accuracy": 0.999}})
    git_commit(repo, "tiny profile")
    gated = dvc(repo, "repro")
    set_params(repo, evaluate={"gates": {"min_accuracy": None}})
    passed = dvc(repo, "repro")
    assert passed.returncode == 0, passed.stdout[-3000:] + passed.stderr[-3000:]
    return SimpleNamespace(repo=repo, gated=gated, passed=passed)


def test_unreachable_gate_stops_repro_before_compress_then_evaluate_and_compress_run(tiny_run):
    repo, gated, passed = tiny_run.repo, tiny_run.gated, tiny_run.passed
    assert gated.returncode != 0
    assert ran_stages(gated) == ["source", *STAGES[:-2]]
    assert "error: quality gate evaluate.gates.min_accuracy failed: test accuracy is" in gated.stderr + gated.stdout
    assert "Traceback" not in gated.stderr + gated.stdout
    first = pipeline_rows(repo).iloc[0]
    assert first["status"] == "FAILED" and first["params.evaluate.gates.min_accuracy"] == "0.999"
    evaluate_runs = runs(repo).query("`tags.mmpipe.stage` == 'evaluate'")
    assert list(evaluate_runs["status"]) == ["FAILED", "FINISHED"]

    # relaxing the gate re-runs evaluate (its param changed), then compress and export
    assert ran_stages(passed) == ["source", "evaluate", "compress", "export", "summary"]
    assert "Stage 'train' didn't change, skipping" in passed.stdout
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["gates"] == {"checked": {}, "passed": True, "failed": []}
    assert (repo / "reports/eval.md").read_text().startswith("# Evaluation report")

    set_params(repo, evaluate={"gates": {"min_accuracy": 1.01}})
    invalid = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=repo, env=stage_env(repo),
                             capture_output=True, text=True, timeout=600)
    set_params(repo, evaluate={"gates": {"min_accuracy": None}})
    assert invalid.returncode == 2
    assert invalid.stderr.strip().splitlines()[-1] == (
        "error: params.yaml: evaluate.gates.min_accuracy: Input should be less than or equal to 1 (got 1.01)")

    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    data = next(iter(shown.values()))["data"]
    assert data["metrics/eval.json"]["data"]["test"]["accuracy"] == metrics["test"]["accuracy"]
    compressed = data["metrics/compress.json"]["data"]
    assert compressed["chosen"] in ("fp32", "pruned", "int8", "student", "student_int8")
    # the tiny profile distils a student: measured per modality subset, int8'd, a candidate like the others
    assert {"student", "student_int8"} <= set(compressed["variants"])
    assert len(compressed["distill"]["retention"]) == 15 and set(compressed["distill"]["robustness"]) == {
        "image", "text", "audio", "tabular"}
    html = dvc(repo, "plots", "show", "-o", "plots_html")
    assert html.returncode == 0, html.stderr
    page = (repo / "plots_html/index.html").read_text()
    assert "Confusion matrix (test split)" in page and "robustness_audio_fused.csv" in page
    assert "var spec = {};" not in page  # every plot renders (no baselines in the tiny profile: files absent)
    shutil.rmtree(repo / "plots_html")


def test_gated_run_is_failed_and_the_passing_run_has_a_complete_row(tiny_run):
    repo = tiny_run.repo
    rows = pipeline_rows(repo)
    assert list(rows["status"]) == ["FAILED", "FINISHED"]  # one row per execution (params.yaml differs)
    row = rows.iloc[-1]
    params = flatten(yaml.safe_load((repo / "params.yaml").read_text()))
    logged = {c.removeprefix("params."): row[c] for c in rows.columns if c.startswith("params.") and pd.notna(row[c])}
    assert set(logged) == set(params) and logged["model.fusion"] == str(params["model.fusion"])
    # collect .. train were skipped in this execution; their headline still comes from their files
    expected = summary.stage_figures(repo)
    assert {key.split(".")[0] for key in expected} == {"collect", "clean", "pretrain", "train", "evaluate", "compress",
                                                       "export"}
    for key, value in expected.items():
        assert row[f"metrics.{key}"] == pytest.approx(value), key
    children = runs(repo)
    mine = children[children["tags.mlflow.parentRunId"] == row["run_id"]]
    assert sorted(mine["tags.mmpipe.stage"]) == ["compress", "evaluate", "export"]
    first = children[children["tags.mlflow.parentRunId"] == rows.iloc[0]["run_id"]]
    assert sorted(first["tags.mmpipe.stage"]) == sorted(STAGES[:-2])
    assert row["tags.git.commit"] == mine["tags.git.commit"].iloc[0] and len(row["tags.git.commit"]) == 40


def test_pretrain_feeds_train_and_evaluate_and_only_its_own_params_rerun_it(tiny_run):
    repo = tiny_run.repo
    pretrained = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pretrained["enabled"] and pretrained["loss"] == "infonce" and pretrained["epochs_run"] == 1
    assert len(pretrained["val"]) == 12  # every ordered pair of the four modalities
    assert (repo / "artifacts/pretrain/aligned.safetensors").exists()
    assert (repo / "dvclive/pretrain/plots/metrics/align/train_loss.tsv").read_text().startswith("step\ttrain_loss")
    trained = json.loads((repo / "metrics/train.json").read_text())["fusion"]
    assert trained["init"]["aligned"]["from"] == "artifacts/pretrain"
    retrieval = json.loads((repo / "metrics/eval.json").read_text())["retrieval"]
    assert retrieval["enabled"] and set(retrieval["pairs"]) == set(pretrained["val"])
    assert retrieval["pairs"]["image->audio"]["chance@5"] == pytest.approx(5 / retrieval["pairs"]["image->audio"]["rows"],
                                                                           abs=1e-4)
    assert "pretrain" in set(runs(repo)["tags.mmpipe.stage"])
    # the training loop's params and the fusion head's do not re-run it; the encoders' and its own do
    for change, expected in ((dict(train={"lr": 0.002}), {"train"}), (dict(model={"fusion": "gated"}), {"train"}),
                             (dict(model={"dim": 24}), {"pretrain", "train"}), (dict(pretrain={"lr": 0.001}), {"pretrain"})):
        original = (repo / "params.yaml").read_bytes()
        try:
            set_params(repo, **change)
            assert changed_stages(repo) == expected, change
        finally:
            (repo / "params.yaml").write_bytes(original)
    assert changed_stages(repo) == set()


def test_compress_param_change_reruns_only_compress_and_export(tiny_run):
    repo = tiny_run.repo
    set_params(repo, compress={"max_accuracy_drop": 0.5})
    again = dvc(repo, "repro")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert ran_stages(again) == ["source", "compress", "export", "summary"]
    assert (repo / "artifacts/deploy/predict.py").exists() and json.loads((repo / "metrics/export.json").read_text())["passed"]


def test_export_param_change_reruns_only_export_and_the_row_is_still_complete(tiny_run):
    repo = tiny_run.repo
    set_params(repo, export={"parity_samples": 64})
    again = dvc(repo, "repro")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # source (fingerprints the data) and summary (completes the MLflow row) always run; they are cheap
    assert ran_stages(again) == ["source", "export", "summary"]
    for name in STAGES[:-1]:
        assert f"Stage '{name}' didn't change, skipping" in again.stdout
    rows = pipeline_rows(repo)
    assert len(rows) == 4  # params.yaml changed: a new execution, a new row (gated, passed, compress, export)
    latest = rows.iloc[-1]
    assert latest["params.export.parity_samples"] == "64"
    # the stages DVC skipped still fill the row, from their metrics files
    for key, value in summary.stage_figures(repo).items():
        assert latest[f"metrics.{key}"] == pytest.approx(value), key
    children = runs(repo)
    assert list(children[children["tags.mlflow.parentRunId"] == latest["run_id"]]["tags.mmpipe.stage"]) == ["export"]
    # the bundle did not change (only its verification did): registered once, from artifacts/deploy itself
    published = json.loads((repo / "metrics/export.json").read_text())["mlflow"]
    assert not published["registered"] and published["alias_decision"].startswith(f"identical to version {published['version']}")
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'mmpipe-fusion'")
    assert len({v.tags["bundle.digest"] for v in versions}) == len(versions) >= 1
    for version in versions:
        logged = client.get_logged_model(version.source.removeprefix("models:/"))
        assert str(logged.status) == "READY"
        stored = mlflow.artifacts.list_artifacts(artifact_uri=f"{logged.artifact_location}/artifacts")
        assert [a.path.rsplit("/", 1)[-1] for a in stored] == ["deploy"]  # not .deploy.tmp-<pid>-...
    git_commit(repo, "export parity on 64 samples")


def changed_stages(repo: Path) -> set[str]:
    """Stages `dvc status` reports changed, apart from the two that always run."""
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    return set(status) - {"source", "summary"}


@pytest.mark.parametrize("edited, expected", [
    ("mmpipe/modalities/audio.py", {"preprocess@audio", "clean", "pretrain", "train", "evaluate", "compress", "export"}),
    ("mmpipe/models/fusion.py", {"pretrain", "train", "evaluate", "compress", "export"}),
    ("mmpipe/training/train.py", {"train", "compress"}),
])
def test_an_edit_marks_only_the_stages_whose_code_it_is(tiny_run, edited, expected):
    """Stage dependencies follow the code: the audio module re-runs no other modality's features, the
    fusion head and the training loop no feature stage at all (a real `dvc status` after a real edit)."""
    repo = tiny_run.repo
    assert changed_stages(repo) == set()  # the previous test left everything up to date
    path = repo / edited
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        assert changed_stages(repo) == expected
    finally:
        path.write_bytes(original)
    assert changed_stages(repo) == set()


def test_a_no_op_repro_leaves_mlflow_alone_until_something_writes_to_the_store(tiny_run):
    """summary skips MLflow (its import and store checks: most of a no-op `dvc repro`) when the row
    already holds everything, and does the whole update again once anything else wrote to the store."""
    repo = tiny_run.repo
    first = dvc(repo, "repro")  # completes the row after the edits above (the marker sees the lock/files)
    assert first.returncode == 0 and ran_stages(first) == ["source", "summary"], first.stdout[-2000:]
    rows = len(pipeline_rows(repo))
    again = dvc(repo, "repro")
    assert ran_stages(again) == ["source", "summary"] and "headline metrics" in again.stdout
    assert "(unchanged)" in again.stdout and len(pipeline_rows(repo)) == rows
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    client.set_tag(pipeline_rows(repo).iloc[-1]["run_id"], "note", "a user's edit in the UI")
    after = dvc(repo, "repro")
    assert after.returncode == 0 and "(unchanged)" not in after.stdout and "headline metrics" in after.stdout


def test_mlflow_server_rest_api_lists_pipeline_rows_and_their_stage_runs(tiny_run, tmp_path):
    repo = tiny_run.repo
    port = free_port()
    env = stage_env(repo)
    server = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
              f"sqlite:///{repo / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    with http_server(server, f"http://127.0.0.1:{port}/health", tmp_path / "server.log", env, tmp_path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                                    "?experiment_name=mmpipe", timeout=30) as response:
            experiment_id = json.loads(response.read())["experiment"]["experiment_id"]
        found = post("runs/search", {"experiment_ids": [experiment_id], "max_results": 100,
                                     "filter": "tags.`mmpipe.role` = 'pipeline'", "order_by": ["attributes.start_time ASC"]})
        parents = found["runs"]
        assert len(parents) == 5  # gated, passed, compress, export, and the no-op test's commit
        gated, passed = parents[0], parents[1]
        params = {p["key"]: p["value"] for p in passed["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in passed["data"]["metrics"]}
        assert params["model.fusion"] == "concat" and params["data.n_samples"] == "200"
        assert params["evaluate.gates.min_accuracy"] == "None"
        assert {"evaluate.test.accuracy", "evaluate.test.f1_macro",  # no fusion gain: no baselines in the tiny profile
                "compress.shipped.file_bytes", "compress.shipped.batch_32_p50_ms"} <= set(metrics)
        assert {"evaluate.robustness.image.relative", "evaluate.robustness.text.relative",
                "evaluate.robustness.audio.relative", "evaluate.robustness.tabular.relative"} <= set(metrics)
        assert gated["info"]["status"] == "FAILED"
        assert not any(m["key"].startswith(("evaluate.", "compress.")) for m in gated["data"]["metrics"])
        children = post("runs/search", {"experiment_ids": [experiment_id], "max_results": 100,
                                        "filter": f"tags.`mlflow.parentRunId` = '{gated['info']['run_id']}'"})["runs"]
        stages = sorted({t["value"] for run in children for t in run["data"]["tags"] if t["key"] == "mmpipe.stage"})
        assert stages == sorted(STAGES[:-2])  # every stage up to evaluate ran in the gated execution
        train = next(run for run in children if {"key": "mmpipe.stage", "value": "train"} in run["data"]["tags"])
        assert {p["key"] for p in train["data"]["params"]} >= {"train.epochs", "model.fusion"}


def run_notebook(name: str, repo: Path) -> tuple[str, int, list[dict]]:
    """Execute notebooks/<name>.ipynb against ``repo``: (its text output, how many figures, outputs)."""
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") and not cell.get("execution_count") for cell in notebook.cells
               if cell.cell_type == "code"), "commit notebooks without outputs"
    previous = dict(os.environ)
    os.environ.update({"MMPIPE_ROOT": str(repo)})
    os.environ.pop("MPLBACKEND", None)  # the kernel must use the inline backend: figures become outputs
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        NotebookClient(notebook, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(repo)}}).execute()  # raises on any failing cell
    finally:
        os.environ.clear()
        os.environ.update(previous)
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    return text, sum("image/png" in o.get("data", {}) for o in outputs), outputs


@pytest.mark.parametrize("name", ["explore_data", "compare_experiments"])
def test_notebook_executes_against_the_tiny_run(tiny_run, name):
    repo = tiny_run.repo
    text, images, outputs = run_notebook(name, repo)
    if name == "explore_data":
        assert f"project: {repo}" in text and "200 samples kept" in text
        assert images >= 3 and any("<audio" in o.get("data", {}).get("text/html", "") for o in outputs)
    else:
        # gated, passed, compress, export, and the no-op test's commit; the gated execution never
        # reached compress: no size or latency
        assert "5 pipeline executions" in text and "4 executions with accuracy, latency and size" in text
        # every execution that reached summary keeps its curves (the gated one stopped at evaluate)
        assert "robustness curves for 4 of 5 executions" in text and images >= 2
        assert "Downloading artifacts" not in text
        assert "no hyperparameter study yet: run `make tune`" in text


def test_fresh_clone_restores_every_stage_from_the_run_cache(tiny_run, tmp_path):
    repo = tiny_run.repo
    # the clones below get what the tiny run ran with (its params, dvc.lock), whichever tests ran before
    for cmd in (["add", "-A"], ["commit", "-q", "--allow-empty", "-m", "tiny run"]):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *cmd], cwd=repo, check=True, env=stage_env(repo))
    pushed = subprocess.run([sys.executable, "tools/push_run_cache.py"], cwd=repo, env=stage_env(repo),
                            capture_output=True, text=True, timeout=600)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert (repo.parent / "mmpipe-dvc-remote").is_dir()  # the default remote: a folder beside the checkout

    clone = repo.parent / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=stage_env(repo))
    (clone / "dvc.lock").unlink()  # nothing recorded: every stage has to come from the run-cache
    pulled = dvc(clone, "pull", "--run-cache", "--allow-missing")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    restored = dvc(clone, "repro", "--pull")
    assert restored.returncode == 0, restored.stdout[-3000:] + restored.stderr[-3000:]
    assert ran_stages(restored) == ["source", "summary"]
    for name in STAGES:
        assert f"Stage '{name}' is cached - skipping run, checking out outputs" in restored.stdout
    for path in ("metrics/eval.json", "metrics/compress.json", "artifacts/deploy/model.onnx", "models/fusion/config.json"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    # no stage ran, so no stage runs were logged; the execution still has its complete row
    assert runs(clone).empty
    rows = pipeline_rows(clone)
    assert len(rows) == 1 and rows["status"][0] == "FINISHED"
    kept = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}").list_artifacts(rows["run_id"][0], "eval")
    assert {Path(a.path).name for a in kept} >= {"robustness_image_fused.csv", "confusion.csv"}
    for key, value in summary.stage_figures(clone).items():
        assert rows[f"metrics.{key}"][0] == pytest.approx(value), key
    shutil.rmtree(clone)

    # the bundle as a DVC artifact (dvc.yaml: artifacts): a registered version (an annotated GTO tag)
    # fetched by another project from a clone, the bytes coming from the DVC remote
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "tag", "-a", "multimodal-classifier@v0.1.0",
                    "-m", "Registering"], cwd=repo, check=True,
                   env=stage_env(repo))
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=stage_env(repo))
    fetched = dvc(tmp_path, "artifacts", "get", str(clone), "multimodal-classifier", "-o", str(tmp_path / "bundle"))
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    shipped = sorted(p.relative_to(repo / "artifacts/deploy") for p in (repo / "artifacts/deploy").rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "bundle") for p in (tmp_path / "bundle").rglob("*") if p.is_file()) == shipped
    for path in shipped:
        assert (tmp_path / "bundle" / path).read_bytes() == (repo / "artifacts/deploy" / path).read_bytes(), path
    assert not (clone / ".dvc/cache").exists()  # nothing came from a cache: the clone has none
    shutil.rmtree(clone)


def own_copy(repo: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run's repository (DVC cache, lock and outputs included) with an empty MLflow
    store of its own (artifact paths are absolute)."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, symlinks=True)
    for store in ("mlflow.db", "mlartifacts"):
        shutil.rmtree(copy / store, ignore_errors=True) if (copy / store).is_dir() else (copy / store).unlink(missing_ok=True)
    return copy


def repro_killed_when(repo: Path, condition, timeout_s: float = 900) -> str:
    """`dvc repro`, killed with SIGKILL (dvc and the stage: the whole process group) as soon as
    ``condition(output so far)`` holds; returns the output. Fails if the run ends first."""
    import signal
    import threading
    import time

    from conftest import DVC

    env = stage_env(repo) | {"PYTHONUNBUFFERED": "1"}  # the stage's lines arrive as they are printed
    proc = subprocess.Popen([DVC, "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while not condition("".join(lines)):
        assert proc.poll() is None, "the run ended before the kill: " + "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    return "".join(lines)


def test_kill_9_during_clean_train_and_export_then_repro_finishes_as_if_never_killed(tiny_run, tmp_path):
    repo = git_init(copy_repo(tmp_path / "repo"))
    set_params(repo, **TINY)
    set_params(repo, train={"baselines": True}, export={"registered_model": None})
    git_commit(repo, "tiny profile with baselines")

    def writing(pattern):
        return lambda output: any(repo.glob(pattern))

    repro_killed_when(repo, writing("data/.clean.tmp-*"))  # clean half-way through its part files
    assert any(repo.glob("data/.clean.tmp-*")) and not (repo / "data/clean").exists()
    second = repro_killed_when(repo, lambda output: "train[fusion]: val accuracy" in output)  # during baseline_image
    assert "removed " in second and ".clean.tmp-" in second  # what the killed clean left
    third = repro_killed_when(repo, writing("artifacts/.deploy.tmp-*"))
    assert "train[image+text+audio+tabular]: already trained by an interrupted run of this stage" in third
    last = dvc(repo, "repro")
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert ran_stages(last) == ["source", "export", "summary"]

    # nothing half-written is left, in the data, the models, the artifacts or the checkpoints
    leftovers = [p for p in repo.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [] and not list((repo / ".checkpoints").rglob("*.pt"))
    # the deterministic stages' outputs are those of the uninterrupted tiny run
    killed, straight = (yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (repo, tiny_run.repo))
    for name in ("collect", "clean", "preprocess@image", "preprocess@text", "preprocess@audio"):
        assert killed[name]["outs"][0]["md5"] == straight[name]["outs"][0]["md5"], name
    fusion = "models/fusion/model.safetensors"
    assert (repo / fusion).read_bytes() == (tiny_run.repo / fusion).read_bytes()
    # the runs of the killed stages were closed as KILLED when those stages ran again
    table = runs(repo)
    assert not (table["status"] == "RUNNING").any() and not (pipeline_rows(repo)["status"] == "RUNNING").any()
    killed_stages = set(table.loc[table["status"] == "KILLED", "tags.mmpipe.stage"])
    assert killed_stages == {"clean", "train", "export"}


def test_pretrained_backbones_from_local_files_through_dvc_repro(tiny_run, tmp_path):
    """A torchvision image model, a torchaudio speech encoder and a Hugging Face text model (with a
    tokenizer trained on the corpus) saved as users save real weights, chosen in params: preprocess
    (waveforms and their cached embeddings, the model's tokenizer), train (freezing what freeze says),
    evaluate, compress and export re-run; the bundle's predictor matches PyTorch on raw files;
    replacing a weights file re-runs train."""
    import torch
    import torchvision
    from safetensors.torch import load_file
    from test_backbones import TINY_WAV2VEC2, corpus_texts, tiny_bert, tiny_wav2vec2

    repo = own_copy(tiny_run.repo, tmp_path)
    torch.manual_seed(3)
    weights = torchvision.models.get_model("resnet18", weights=None).state_dict()
    torch.save(weights, repo / "weights/image/resnet18.pth")
    speech = tiny_wav2vec2(repo / "weights/audio/wav2vec2_tiny.pth")
    language = tiny_bert(repo / "weights/text/tiny-bert", corpus_texts(repo / "data/clean"))
    # the image size stays the corpus's 32 px (auto would take resnet18's 224: the same mechanics, 50x the pixels)
    set_params(repo, preprocess={"image": {"size": 32}, "audio": {"features": "waveform", "embed": True},
                                 "text": {"tokenizer": "weights/text/tiny-bert"}},
               model={"encoders": {
                   "image": {"arch": "resnet18", "weights": "weights/image/resnet18.pth", "freeze": 2},
                   "audio": {"arch": "wav2vec2_model", "options": TINY_WAV2VEC2, "weights": "weights/audio/wav2vec2_tiny.pth",
                             "freeze": "all"},
                   "text": {"arch": "huggingface", "weights": "weights/text/tiny-bert", "freeze": 1}}},
               # dynamic int8 for the transformers' MatMul/Gather; no student (it scales small_cnn encoders only)
               compress={"quantize": {"dynamic": True}, "distill": {"enabled": False}})
    run = dvc(repo, "repro")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # each preprocess@<m> depends on its own weights/<m>/ (and params): tabular has neither changed
    assert ran_stages(run) == ["source", "preprocess@image", "preprocess@text", "preprocess@audio", "pretrain",
                               "train", "evaluate", "compress", "export", "summary"]
    # the alignment starts from the same local backbones (frozen blocks kept) and the cached audio embeddings
    aligned = json.loads((repo / "metrics/pretrain.json").read_text())
    assert aligned["pretrained_backbones"]["image"]["frozen_blocks"] == 2
    assert aligned["pretrained_backbones"]["audio"]["frozen_blocks"] == 10
    assert "text encoder bert: weights weights/text/tiny-bert, 1 of 3 blocks frozen" in run.stdout
    assert "image encoder resnet18: weights weights/image/resnet18.pth, 2 of 10 blocks frozen" in run.stdout
    assert "audio encoder wav2vec2_model: weights weights/audio/wav2vec2_tiny.pth, 10 of 10 blocks frozen" in run.stdout
    assert "train[image+text+audio+tabular]: audio from the embeddings preprocess cached" in run.stdout
    cache = json.loads((repo / "metrics/preprocess_audio.json").read_text())["embedding"]
    assert cache["samples"] > 0 and cache["device"] == "cpu" and (repo / "data/features/audio/embedding-00000.npy").exists()

    info = json.loads((repo / "metrics/train.json").read_text())["fusion"]["pretrained"]
    assert info["image"]["sha256"] == hashlib.sha256((repo / "weights/image/resnet18.pth").read_bytes()).hexdigest()
    assert info["audio"]["sha256"] == hashlib.sha256((repo / "weights/audio/wav2vec2_tiny.pth").read_bytes()).hexdigest()
    trained = load_file(str(repo / "models/fusion/model.safetensors"))
    for key, value in weights.items():
        if key.startswith(("conv1.", "bn1.")):  # the two frozen blocks: exactly the file's
            assert torch.equal(trained[f"encoders.image.backbone.{key}"], value), key
    assert not torch.equal(trained["encoders.image.backbone.layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"])
    for key, value in language.items():  # the embeddings frozen, the layers trained, the [CLS] pooler dropped
        if not key.startswith("pooler."):
            same = torch.equal(trained[f"encoders.text.backbone.{key}"], value)
            if key.startswith("embeddings."):
                assert same, key
            elif key.endswith("dense.weight"):
                assert not same, f"{key} did not train"
    for key, value in speech.items():  # wholly frozen (its output cached): exactly the file's
        assert torch.equal(trained[f"encoders.audio.backbone.{key}"], value), key
    compressed = json.loads((repo / "metrics/compress.json").read_text())
    assert compressed["variants"]["int8_dynamic"]["file_bytes"] < compressed["variants"]["fp32"]["file_bytes"]
    exported = json.loads((repo / "metrics/export.json").read_text())
    assert exported["passed"] and exported["fp32_onnx_vs_pytorch_max_abs_logit_diff"] < 1e-3
    assert exported["predictor_raw_test_accuracy"] == pytest.approx(exported["compress_test_accuracy_shipped"], abs=0.02)
    card = (repo / "artifacts/deploy/MODEL_CARD.md").read_text()
    assert "- image: `resnet18` backbone, weights from `weights/image/resnet18.pth`, frozen blocks: 2." in card
    assert "- audio: `wav2vec2_model` backbone, weights from `weights/audio/wav2vec2_tiny.pth`, frozen blocks: all." in card
    manifest = json.loads((repo / "artifacts/deploy/manifest.json").read_text())
    assert manifest["preprocessing"]["audio"]["features"] == "waveform" and "embedding" not in manifest["preprocessing"]["audio"]
    assert manifest["preprocessing"]["text"]["kind"] == "pretrained" and "model_config" not in manifest["preprocessing"]["text"]
    assert "tokenizers==" in (repo / "artifacts/deploy/requirements.txt").read_text()
    assert "- text: `bert` backbone" not in card and "- text: `huggingface` backbone, weights from `weights/text/tiny-bert`" in card

    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, repo / "weights/image/resnet18.pth")
    status = dvc(repo, "status")
    assert "train:" in status.stdout and "modified:" in status.stdout and "weights" in status.stdout
    changed = {line.strip().rstrip(":") for line in status.stdout.splitlines() if line and not line.startswith("\t")}
    assert "preprocess@image" in changed and not changed & {"preprocess@text", "preprocess@audio", "preprocess@tabular"}


def test_dvc_exp_run_shows_each_epoch_live_then_in_exp_show_and_mlflow(tiny_run, tmp_path):
    """DVCLive files are rewritten after every epoch while `dvc exp run` trains; the experiment then
    carries them (`dvc exp show`), and the MLflow run has the same curve as step metrics."""
    import threading
    import time

    from conftest import DVC

    repo = own_copy(tiny_run.repo, tmp_path)
    live = repo / "dvclive/train/metrics.json"
    proc = subprocess.Popen([DVC, "exp", "run", "train", "-n", "live", "-S", "train.epochs=6", "-S", "train.batch_size=16"],
                            cwd=repo, env=stage_env(repo) | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    seen = set()  # epochs whose values were on disk while the stage was still training
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        training = "Running stage 'train'" in "".join(lines) and "train[fusion]: val accuracy" not in "".join(lines)
        if training and live.exists():
            with contextlib.suppress(ValueError, OSError):
                seen.add(json.loads(live.read_text())["step"])
        time.sleep(0.01)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert len(seen) >= 2 and seen <= set(range(6)), seen  # several epochs observed before train ended

    curve = pd.read_csv(repo / "dvclive/train/plots/metrics/fusion/val_accuracy.tsv", sep="\t")
    assert list(curve["step"]) == list(range(6))
    final = json.loads(live.read_text())
    assert final["step"] == 5 and final["fusion"]["val_accuracy"] == pytest.approx(curve["val_accuracy"].iloc[-1])
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {exp["name"]: exp["data"] for commit in shown for exp in (commit.get("experiments") or []) for exp in exp["revs"]}
    assert exps["live"]["metrics"]["dvclive/train/metrics.json"]["data"] == final
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    train_run = runs(repo).query("`tags.mmpipe.stage` == 'train'").iloc[-1]
    history = client.get_metric_history(train_run["run_id"], "fusion/val_accuracy")  # the curve; fusion.val_accuracy: the best
    assert [m.step for m in history] == list(range(6))
    assert [m.value for m in history] == pytest.approx(list(curve["val_accuracy"]))
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(train_run["run_id"]).inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"} and inputs["train"]["mlflow.data.context"] == "training"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert inputs["train"]["dvc.data/clean"] == lock["clean"]["outs"][0]["md5"]


def test_tune_prunes_resumes_from_sqlite_and_runs_the_best_as_a_dvc_experiment(tiny_run, tmp_path):
    """A study of 3 trials (the second forced to be pruned: its learning rate cannot learn anything),
    resumed to 4; one MLflow row with 4 child runs; the best values run through the whole pipeline as
    a named DVC experiment whose pipeline row and registered model version carry lineage and metrics."""
    import optuna

    repo = own_copy(tiny_run.repo, tmp_path)
    set_params(repo, train={"epochs": 4, "batch_size": 16},
               tune={"trials": 3, "run_best": False, "pruner": {"kind": "median", "startup_trials": 1, "warmup_epochs": 1},
                     "space": {"train.lr": {"low": 1e-6, "high": 0.02, "log": True},
                               "model.fusion": {"choices": ["concat", "gated"]}},
                     "enqueue": [{"train.lr": 0.01, "model.fusion": "concat"}, {"train.lr": 1e-6, "model.fusion": "concat"}]})
    command = [sys.executable, "-m", "stages.tune"]
    first = subprocess.run(command, cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "0 trials done, 3 to run" in first.stdout and "tune: trial 1 pruned (val_accuracy" in first.stdout
    assert "dvc exp run -n tuned-" in first.stdout  # run_best off: the command is printed

    set_params(repo, tune={"trials": 4, "run_best": True})
    second = subprocess.run(command, cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "3 trials done, 1 to run" in second.stdout and "tune: trial 3 " in second.stdout
    name = second.stdout.split("tune: study ", 1)[1].split(" ", 1)[0]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{repo / 'tune.db'}")
    states = {t.number: t.state.name for t in study.trials}
    assert len(states) == 4 and states[0] == "COMPLETE" and states[1] == "PRUNED"

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    table = all_runs(repo)
    tune_rows = table[table["tags.mmpipe.role"] == "tune"]
    assert len(tune_rows) == 1 and tune_rows["tags.tune.study"].iloc[0] == name
    trials = table[table["tags.mlflow.parentRunId"] == tune_rows["run_id"].iloc[0]]
    assert sorted(trials["tags.optuna.trial"].astype(int)) == [0, 1, 2, 3]
    assert dict(zip(trials["tags.optuna.trial"].astype(int), trials["tags.optuna.state"])) == states
    assert set(trials["status"]) == {"FINISHED"}  # a pruned trial is finished, marked PRUNED
    pruned = trials[trials["tags.optuna.trial"] == "1"].iloc[0]
    assert pruned["tags.tune.pruned_at_epoch"] == "1" and pruned["params.train.lr"] == "1e-06"
    assert {a.path for a in client.list_artifacts(tune_rows["run_id"].iloc[0])} >= {"history.png", "trials.csv", "summary.json"}

    best = study.best_trial
    exp = f"tuned-{name}-t{best.number}"
    assert tune_rows["tags.tune.best_experiment"].iloc[0] == exp
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    exps = {e["name"]: e["data"] for commit in shown for e in (commit.get("experiments") or []) for e in e["revs"]}
    ran = flatten(exps[exp]["params"]["params.yaml"]["data"])
    assert all(ran[key] == pytest.approx(value) if isinstance(value, float) else ran[key] == value
               for key, value in best.params.items())
    assert 0 <= exps[exp]["metrics"]["metrics/eval.json"]["data"]["test"]["accuracy"] <= 1

    row = pipeline_rows(repo).set_index("tags.dvc.exp_name").loc[exp]
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in client.get_run(row["run_id"]).inputs.dataset_inputs}
    assert {name: tags["mlflow.data.context"] for name, tags in inputs.items()} == {
        "train": "training", "val": "validation", "test": "testing"}
    assert all(tags["dvc.hashes"] == "dvc.lock" and tags["dvc.data/clean"].endswith(".dir") for tags in inputs.values())
    [version] = client.search_model_versions(f"name = 'mmpipe-fusion' and tag.`dvc.exp_name` = '{exp}'")
    assert version.description == (repo / "artifacts/deploy/MODEL_CARD.md").read_text()
    assert version.tags["shipped_variant"] == exps[exp]["metrics"]["metrics/compress.json"]["data"]["shipped"]["variant"]
    logged = {m.key: m.value for m in client.get_logged_model(version.source.removeprefix("models:/")).metrics}
    assert logged["test_accuracy"] == pytest.approx(exps[exp]["metrics"]["metrics/eval.json"]["data"]["test"]["accuracy"])
    assert logged["file_bytes"] == exps[exp]["metrics"]["metrics/compress.json"]["data"]["shipped"]["file_bytes"]

    # the comparison notebook shows the study: its trials and the importance of what was searched
    text, images, _ = run_notebook("compare_experiments", repo)
    assert f"study {name}: 4 trials (" in text and f"{list(states.values()).count('PRUNED')} pruned" in text and images >= 3
