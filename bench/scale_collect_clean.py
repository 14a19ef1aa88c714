"""Scale check for collect + clean: wall time and peak memory (whole process tree) at N samples.

    python -m bench.scale_collect_clean --samples 100000

Runs both stages in a temporary copy of the repository (its own MLflow store), samples the
resident memory of the stage process and all its workers every 0.2 s, and prints/writes
reports/bench_scale.json. Absolute figures hold for the machine they were taken on only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from bench.realistic import copy_repo

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_stage(module: str, cwd: Path, env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module], cwd=cwd, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{module} failed with exit code {proc.returncode}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_scale.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmpipe-scale-"))
    copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["data"]["n_samples"] = args.samples
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(work)}

    results = {"samples": args.samples, "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"}
    for stage in ("collect", "clean"):
        results[stage] = run_stage(f"stages.{stage}", work, env)
    results["total_seconds"] = round(results["collect"]["seconds"] + results["clean"]["seconds"], 1)
    results["peak_rss_mb"] = max(results["collect"]["peak_rss_mb"], results["clean"]["peak_rss_mb"])
    results["raw_mb"] = round(sum(p.stat().st_size for p in (work / "data/raw").rglob("*") if p.is_file()) / 2**20, 1)
    results["clean_mb"] = round(sum(p.stat().st_size for p in (work / "data/clean").rglob("*") if p.is_file()) / 2**20, 1)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
