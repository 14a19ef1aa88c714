"""preprocess@<modality>: data/clean -> data/features/<modality>/ (index, tensor shards, fitted state).

With preprocess.partitions = [0..N-1]: preprocess-part@<modality>-<k> (``python -m stages.preprocess
<modality> --part k``) featurises the k-th 1/N of the shards into data/partitions/<modality>/<k>/ (any
machine can run it), and preprocess@<modality> joins the N folders, byte for byte the single run's output.
"""

import sys

from mmpipe import layout, params, tracking
from mmpipe.errors import PipelineError
from mmpipe.features.preprocess import preprocess, preprocess_part
from mmpipe.io import atomic_dir
from mmpipe.modalities import names
from mmpipe.stage import run_stage


def main() -> None:
    args = sys.argv[1:]
    if not (len(args) == 1 or (len(args) == 3 and args[1] == "--part" and args[2].isdigit())) or args[0] not in names():
        raise PipelineError(f"usage: python -m stages.preprocess <{'|'.join(names())}> [--part K]")
    modality = args[0]
    cfg = params.load("preprocess")
    if len(args) == 3:
        part = int(args[2])
        with atomic_dir(layout.partition(modality, part)) as tmp:
            record = preprocess_part(modality, cfg, layout.CLEAN, tmp, part, params.load("model"))
        if record["enabled"]:
            print(f"preprocess-part@{modality}-{part}: shards {record['shards'][0]}..{record['shards'][1] - 1} "
                  f"of {record['samples']} samples in {record['seconds']:.1f}s -> {layout.partition(modality, part)}")
        return
    with tracking.stage_run(f"preprocess@{modality}", cfg) as run:
        with atomic_dir(layout.features(modality)) as tmp:
            metrics = preprocess(modality, cfg, layout.CLEAN, tmp, params.load("model"), layout.partitions(modality))
        run.write_metrics(layout.preprocess_metrics(modality), metrics)
    if not metrics["enabled"]:
        return
    print(f"preprocess@{modality}: {metrics['samples']} samples ({metrics['available']} available) -> "
          f"{metrics['bytes'] / 2**20:.1f} MiB of shards on {metrics['device']} in {metrics['seconds']:.1f}s "
          f"({metrics['samples_per_s']:.0f} samples/s)"
          + (f", joined from {metrics['partitions']} partitions" if metrics["partitions"] else ""))
    if "embedding" in metrics:
        e = metrics["embedding"]
        print(f"preprocess@{modality}: cached {e['samples']} backbone embeddings ({e['bytes'] / 2**20:.1f} MiB) "
              f"on {e['device']} in {e['seconds']:.1f}s ({e['samples_per_s']:.0f} samples/s)")


if __name__ == "__main__":
    run_stage(main)
