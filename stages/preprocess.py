"""preprocess@<modality>: data/clean -> data/features/<modality>/ (index, tensor shards, fitted state)."""

import sys

from mmpipe import layout, params, tracking
from mmpipe.errors import PipelineError
from mmpipe.features.preprocess import preprocess
from mmpipe.io import atomic_dir
from mmpipe.modalities import names
from mmpipe.stage import run_stage


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in names():
        raise PipelineError(f"usage: python -m stages.preprocess <{'|'.join(names())}>")
    modality = sys.argv[1]
    cfg = params.load("preprocess")
    with tracking.stage_run(f"preprocess@{modality}", cfg) as run:
        with atomic_dir(layout.features(modality)) as tmp:
            metrics = preprocess(modality, cfg, layout.CLEAN, tmp, params.load("model"))
        run.write_metrics(layout.preprocess_metrics(modality), metrics)
    if not metrics["enabled"]:
        return
    print(f"preprocess@{modality}: {metrics['samples']} samples ({metrics['available']} available) -> "
          f"{metrics['bytes'] / 2**20:.1f} MiB of shards on {metrics['device']} in {metrics['seconds']:.1f}s "
          f"({metrics['samples_per_s']:.0f} samples/s)")
    if "embedding" in metrics:
        e = metrics["embedding"]
        print(f"preprocess@{modality}: cached {e['samples']} backbone embeddings ({e['bytes'] / 2**20:.1f} MiB) "
              f"on {e['device']} in {e['seconds']:.1f}s ({e['samples_per_s']:.0f} samples/s)")


if __name__ == "__main__":
    run_stage(main)
