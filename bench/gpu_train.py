"""Train the fusion model on a CUDA GPU (bf16 autocast, GPU-resident data) and report throughput.

    python -m bench.gpu_train --samples 4000

Builds the built-in corpus and its features with the committed params (not timed), then trains
the fusion model with ``train.device: cuda`` (and once more with ``train.compile: true``), printing
JSON: samples/s, peak GPU memory, validation accuracy, seconds. Compare with the CPU figures of
``metrics/train.json`` from the same params.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mmpipe import params
from mmpipe.data.clean import clean
from mmpipe.data.collect import collect
from mmpipe.features.preprocess import preprocess
from mmpipe.features.loader import feature_modalities
from mmpipe.modalities import names
from mmpipe.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run (the tests')")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mmpipe-gpu-train-"))
    for folder in ("raw", "clean"):  # the stages write into existing folders
        (work / folder).mkdir()
    data = params.load("data", ROOT / "params.yaml").model_copy(update={"n_samples": args.samples})
    collect(data, work / "raw")
    clean(params.load("clean", ROOT / "params.yaml"), work / "raw", work / "clean")
    for m in names():  # every registered modality: the loader opens them all
        (work / "features" / m).mkdir(parents=True)
        preprocess(m, params.load("preprocess", ROOT / "params.yaml"), work / "clean", work / "features" / m)
    base = params.load("train", ROOT / "params.yaml")
    if args.epochs:
        base = base.model_copy(update={"epochs": args.epochs})
    model_cfg = params.load("model", ROOT / "params.yaml")
    cuda = args.device.startswith("cuda")
    out = {"device": args.device, "gpu": torch.cuda.get_device_name() if cuda else None, "samples": args.samples}
    runs = [(args.device, {"device": args.device})]
    if args.compile:
        runs.append((f"{args.device}_compile", {"device": args.device, "compile": True}))
    for name, update in runs:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = train(base.model_copy(update=update), model_cfg, work / "features", list(feature_modalities(work / "features")),
                       work / f"model-{name}", work / "checkpoints")
        out[name] = result["metrics"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
