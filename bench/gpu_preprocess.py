"""Audio preprocessing and loading on a CUDA GPU vs this machine's CPU cores, side by side.

    python -m bench.gpu_preprocess --samples 20000

Builds the built-in corpus (collect + clean, not timed), then times preprocess@audio with
``device: cpu`` (all cores) and ``device: cuda``, checks that both give the same features (within
float16 rounding), and times one epoch of batches of 256 from memory-mapped shards vs from a
GPU-resident copy (``FeatureSet.to("cuda")``). Prints JSON; needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmpipe import params
from mmpipe.data.clean import clean
from mmpipe.data.collect import collect
from mmpipe.features.loader import FeatureSet
from mmpipe.features.preprocess import preprocess
from mmpipe.modalities import names


def epoch(features: FeatureSet, device: str) -> float:
    started = time.perf_counter()
    for batch in features.batches(256, shuffle=True):
        batch["audio"].float().sum()  # touch the data where it lives
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(features) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--device", default="cuda", help="the accelerator side (cpu: a smoke run, the tests')")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --device cpu)")
    work = Path(tempfile.mkdtemp(prefix="mmpipe-gpu-"))
    for folder in ("raw", "clean"):  # the stages write into existing folders
        (work / folder).mkdir()
    collect(params.validate("data", {"n_samples": args.samples}), work / "raw")
    clean(params.validate("clean", {}), work / "raw", work / "clean")
    out = {"samples": args.samples, "device": args.device, "cpu_cores": os.cpu_count(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    for side, device in (("cpu", "cpu"), ("accelerator", args.device)):
        prep = params.validate("preprocess", {"device": device})
        (work / side / "audio").mkdir(parents=True)
        started = time.perf_counter()
        metrics = preprocess("audio", prep, work / "clean", work / side / "audio")
        out[f"preprocess_audio_{side}_s"] = round(time.perf_counter() - started, 2)
        out[f"preprocess_audio_{side}_samples_per_s"] = metrics["samples_per_s"]
    a = np.load(work / "cpu/audio/audio-00000.npy").astype(np.float32)
    b = np.load(work / "accelerator/audio/audio-00000.npy").astype(np.float32)
    out["accelerator_vs_cpu_max_abs_diff"] = float(np.abs(a - b).max())
    out["accelerator_speedup"] = round(out["preprocess_audio_cpu_s"] / out["preprocess_audio_accelerator_s"], 2)
    for m in names():  # the loader opens every registered modality
        if m != "audio":
            (work / "cpu" / m).mkdir()
            preprocess(m, params.validate("preprocess", {}), work / "clean", work / "cpu" / m)
            (work / "accelerator" / m).symlink_to(work / "cpu" / m)
    mapped = FeatureSet(work / "cpu", split=None)
    out["loader_mmap_samples_per_s"] = round(epoch(mapped, "cpu"))
    resident = FeatureSet(work / "accelerator", split=None).to(args.device)
    epoch(resident, args.device)  # warm-up
    out["loader_resident_samples_per_s"] = round(epoch(resident, args.device))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
