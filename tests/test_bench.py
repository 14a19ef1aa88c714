"""Every entry point under bench/, at a tiny size, so that a change that breaks one fails here (no
timing is asserted: figures belong in docs/benchmarks.md). ``test_every_bench_entry_point_is_run_here``
keeps the list complete: a new benchmark without a smoke run fails it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, set_params

ROOT = Path(__file__).resolve().parents[1]
SMOKE_RUNS: set[str] = set()  # the entry points this file runs (filled as the tests are collected)


def run_bench(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_make_bench_preprocessing_and_loader_run_with_every_registered_modality(tmp_path):
    """`make bench` died once a fourth modality was registered: the loader opens every registered one."""
    run_bench("bench.run", "--samples", "300", "--out", str(tmp_path / "bench.json"))
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["samples"] == 300 and report["preprocess_audio_files"] > 0 and report["preprocess_image_files"] > 0
    assert report["preprocess_image_max_abs_diff"] == 0.0 and report["preprocess_audio_max_abs_diff"] < 0.05
    assert report["loader_samples_per_s"] > 0 and report["loader_naive_samples_per_s"] > 0


def test_hostile_inputs_bench_runs_on_a_bundle(bundle, tmp_path):
    run_bench("bench.hostile_inputs", "--bundle", str(bundle["folder"]), "--rows", "200", "--over-rows", "20000",
              "--out", str(tmp_path / "hostile.json"))
    report = json.loads((tmp_path / "hostile.json").read_text())
    over = report["request_parquet_20000_rows"]
    assert over["guarded"]["answer_bytes"] < 1000 < over["mlflow_parsing_then_per_row_errors"]["answer_bytes"]
    assert report["png_4096x4096"]["bytes"] < 100_000 and report["flac_29s_8ch_384k"]["predictor"]["seconds"] > 0


@pytest.fixture(scope="module")
def workspace(tiny_corpus, tiny_model, bundle, tmp_path_factory) -> Path:
    """A folder laid out as the benchmarks expect the repository after `make repro` (data/features,
    models/fusion, artifacts/compressed), on the session's tiny run, with the tiny params profile."""
    root = tmp_path_factory.mktemp("bench_workspace")
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(root, **TINY)
    for link, target in (("data/features", tiny_corpus / "features"), ("data/raw", tiny_corpus / "raw"),
                         ("data/clean", tiny_corpus / "clean"), ("models/fusion", tiny_model),
                         ("artifacts/compressed", bundle["folder"].parent / "compressed"),
                         ("artifacts/deploy", bundle["folder"])):
        (root / link).parent.mkdir(parents=True, exist_ok=True)
        (root / link).symlink_to(target)
    (root / "metrics").mkdir()
    (root / "metrics" / "compress.json").write_text(json.dumps(bundle["compress"]))  # what compress chose there
    return root


SELF_CONTAINED = {  # entry point -> tiny arguments; they build their own inputs
    "bench.int8_kernels": ["--runs", "1"],
    "bench.backbones": ["--archs", "image:resnet18", "--size", "32", "--batch", "2", "--repeats", "1", "--runs", "1"],
    "bench.checkpointing": ["--archs", "image:resnet18", "--size", "32", "--batch", "2", "--repeats", "1"],
    "bench.gpu_preprocess": ["--device", "cpu", "--samples", "60"],
    "bench.scale_collect_clean": ["--samples", "100", "--out", "{tmp}/scale.json"],
    "bench.realistic": ["--samples", "40", "--until", "collect", "--out", "{tmp}/realistic"],
    "bench.scaling": ["--samples", "40", "--until", "collect", "--out", "{tmp}/scaling"],
}
ON_THE_WORKSPACE = {  # entry point -> tiny arguments; they read what `make repro` leaves in the repository
    "bench.fusion_choices": ["--fusions", "concat"],
    "bench.prune_sweep": ["0.3:1"],
    "bench.compressed_variants": ["--rounds", "1", "--runs", "2"],
    "bench.trust": ["--rounds", "1", "--runs", "5"],
    "bench.drift": ["--windows", "10", "--window-rows", "30"],
    "bench.label_efficiency": ["--fractions", "0.5", "1", "--epochs", "1", "--pretrain-epochs", "1"],
    "bench.distill": ["--seeds", "1", "--first-seed", "1", "--epochs", "1", "--rounds", "1", "--runs", "2",
                      "--batch-1-runs", "3"],
}
SMOKE_RUNS |= {"bench.run", "bench.hostile_inputs", "bench.gpu_run", *SELF_CONTAINED, *ON_THE_WORKSPACE}


@pytest.mark.parametrize("entry", sorted(SELF_CONTAINED))
def test_self_contained_bench_runs_at_a_tiny_size(entry, tmp_path):
    out = run_bench(entry, *(arg.format(tmp=tmp_path) for arg in SELF_CONTAINED[entry]), cwd=tmp_path)
    assert out.strip()


@pytest.mark.parametrize("entry", sorted(ON_THE_WORKSPACE))
def test_bench_on_the_pipeline_outputs_runs_at_a_tiny_size(entry, workspace):
    run_bench(entry, *ON_THE_WORKSPACE[entry], cwd=workspace)
    report = {"bench.fusion_choices": "fusion_choices.json", "bench.prune_sweep": "prune_sweep.json",
              "bench.compressed_variants": "compressed_variants.json", "bench.trust": "trust.json",
              "bench.drift": "drift.json", "bench.label_efficiency": "label_efficiency.json",
              "bench.distill": "distill.json"}[entry]
    assert json.loads((workspace / "reports" / report).read_text())


def gpu_run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(["bash", "bench/gpu_run.sh", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_gpu_run_dry_run_exercises_every_part_on_cpu(tmp_path):
    """The GPU script (one command on a lent machine) at tiny sizes on CPU: every part runs, what needs CUDA is
    recorded as skipped with why, and the JSON and markdown land in the output folder."""
    proc = gpu_run(tmp_path / "out", "--dry-run", "--budget-s", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_run.json").read_text())
    assert {name: p["status"] for name, p in report["parts"].items()} == dict.fromkeys(
        ["environment", "default_repro", "train_throughput", "evaluate_sweeps", "onnx_latency", "realistic"], "done")
    results = report["results"]
    assert results["environment"]["cpu_cores"] >= 1 and results["environment"]["torch"].startswith("2.11")
    assert results["default_repro"]["dvc_repro_wall_s"] > 0 and "train" in results["default_repro"]["stages"]
    runs = results["train_throughput"]["runs"]
    assert runs["fusion@16/eager"]["samples_per_s_last_epoch"] > 0 and "large_batch_recipe" in runs
    assert results["train_throughput"]["skipped"]["fusion@64/cuda_graphs"] == "needs CUDA"
    assert results["evaluate_sweeps"]["cpu_s"] > 0 and results["evaluate_sweeps"]["skipped"] == {"cuda": "needs CUDA"}
    latency = results["onnx_latency"]
    assert latency["fp16/CPUExecutionProvider"]["max_abs_diff_vs_fp32_cpu"] < 0.05  # the fp16 conversion's parity
    assert latency["fp32/CPUExecutionProvider"]["max_abs_diff_vs_fp32_cpu"] == 0.0
    assert results["realistic"]["samples"] == 60 and results["realistic"]["stages"]["preprocess@image"]["wall_s"] > 0
    table = (tmp_path / "out" / "gpu_run.md").read_text()
    assert "| train_throughput | done |" in table and "dry run" in table


def test_gpu_run_kills_a_part_over_its_time_box_and_skips_what_needs_it(tmp_path):
    proc = gpu_run(tmp_path / "out", "--dry-run", "--budget-s", "30")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads((tmp_path / "out" / "gpu_run.json").read_text())["parts"]
    assert parts["environment"]["status"].startswith("skipped: the budget ran out")  # 3 % of 30 s: under 5 s
    assert parts["default_repro"]["status"] == "skipped: over its time box of 9 s"
    assert parts["train_throughput"]["status"] == "skipped: default_repro did not finish"
    assert parts["realistic"]["status"].startswith("skipped: over its time box")
    assert parts["default_repro"]["seconds"] < 20  # killed on time, its dvc and stages with it


def test_every_bench_entry_point_is_run_here():
    entries = {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")
               if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M)}
    assert entries == SMOKE_RUNS
    # and what the README and the Makefile tell users to run is among them
    told = set(re.findall(r"python -m (bench\.\w+)", (ROOT / "README.md").read_text() + (ROOT / "Makefile").read_text()))
    assert told <= entries, told - entries
