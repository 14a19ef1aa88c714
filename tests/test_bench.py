"""The benchmarks the README tells users to run, at a tiny size, so that a change that breaks one fails
here (no timing is asserted: figures belong in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


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
