"""preprocess@<modality>: data/clean -> data/features/<modality>/ (index, tensor shards, fitted state)."""

import sys
from pathlib import Path

from mmpipe import params, tracking
from mmpipe.errors import PipelineError
from mmpipe.features.preprocess import preprocess
from mmpipe.io import atomic_dir, write_json_atomic
from mmpipe.modalities import names
from mmpipe.stage import run_stage

CLEAN = Path("data/clean")


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in names():
        raise PipelineError(f"usage: python -m stages.preprocess <{'|'.join(names())}>")
    modality = sys.argv[1]
    cfg = params.load("preprocess")
    metrics_file = Path(f"metrics/preprocess_{modality}.json")
    with tracking.stage_run(f"preprocess@{modality}", cfg) as run:
        with atomic_dir(Path("data/features") / modality) as tmp:
            metrics = preprocess(modality, cfg, CLEAN, tmp)
        write_json_atomic(metrics_file, metrics)
        run.log_metrics_file(metrics_file)
    if not metrics["enabled"]:
        return
    print(f"preprocess@{modality}: {metrics['samples']} samples ({metrics['available']} available) -> "
          f"{metrics['bytes'] / 2**20:.1f} MiB of shards on {metrics['device']} in {metrics['seconds']:.1f}s "
          f"({metrics['samples_per_s']:.0f} samples/s)")


if __name__ == "__main__":
    run_stage(main)
