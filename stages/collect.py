"""collect: read data.source (built-in corpus, manifest or folder) into data/raw/*.parquet."""

from pathlib import Path

from mmpipe import params, tracking
from mmpipe.data.collect import collect
from mmpipe.io import atomic_dir, write_json_atomic
from mmpipe.stage import run_stage

RAW = Path("data/raw")
METRICS = Path("metrics/collect.json")


def main() -> None:
    data = params.load("data")
    with tracking.stage_run("collect", data) as run:
        with atomic_dir(RAW) as tmp:
            metrics = collect(data, tmp)
        write_json_atomic(METRICS, metrics)
        run.log_metrics_file(METRICS)
    present = ", ".join(f"{m} {n}" for m, n in metrics["present"].items())
    errors = sum(metrics["fetch_errors"].values())
    print(f"collect: {metrics['samples']} samples from {data.source} into {metrics['files']} file(s) "
          f"[present: {present}; fetch errors: {errors}] in {metrics['seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
