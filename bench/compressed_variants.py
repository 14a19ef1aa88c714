"""Latency of the compress stage's variants, timed side by side in interleaved rounds.

The compress stage times each variant once, one after the other, so a burst of load on a shared
machine can skew one figure. This benchmark times fp32 / pruned / int8 ONNX (artifacts/compressed/)
and PyTorch eager fp32 (models/fusion) round-robin, ``--rounds`` times, at a fixed thread count, and
reports the median latency and the median per-round speed-up against fp32 ONNX and PyTorch eager.

    python -m bench.compressed_variants --rounds 7
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch

from mmpipe.compress.onnx_model import onnx_feeds, session
from mmpipe.features.loader import FeatureSet
from mmpipe.io import write_json_atomic
from mmpipe.training.model_io import load_model, to_model_inputs
from mmpipe.timing import latency_ms

VARIANTS = Path("artifacts/compressed")
REPORT = Path("reports/compressed_variants.json")


@torch.no_grad()
def interleaved_p50(runners: dict, sizes, rounds: int, runs: int | dict[int, int]) -> dict[str, np.ndarray]:
    """{"<name>@<size>": the p50 latency (ms) of ``runners[name](size)`` in each round}: every runner timed at
    every size once per round, round-robin, so a burst of load on the machine hits them all alike. ``runs``:
    timed calls per runner per round, or by size (a batch-1 call is cheap: more calls steady its p50)."""
    timings: dict[str, list[float]] = {}
    for _ in range(rounds):
        for size in sizes:
            calls = runs[size] if isinstance(runs, dict) else runs
            for name, run in runners.items():
                timings.setdefault(f"{name}@{size}", []).append(latency_ms(lambda: run(size), calls)["p50"])
    return {k: np.array(v) for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(Path("models/fusion")).eval()
    val = FeatureSet(Path("data/features"), split="val")
    big = min(32, len(val))  # batch 32 (a tiny validation split: all of it)
    batch = val.get(np.arange(big))
    feeds = onnx_feeds(batch, model)
    eager_inputs = to_model_inputs(batch, model.modalities, torch.device("cpu"))
    names = [n for n in ("fp32", "pruned", "int8") if (VARIANTS / f"{n}.onnx").exists()]
    sessions = {n: session(VARIANTS / f"{n}.onnx", args.threads) for n in names}
    runners = {name: (lambda size, sess=sess: sess.run(["logits"], {k: v[:size] for k, v in feeds.items()}))
               for name, sess in sessions.items()}
    runners["pytorch"] = lambda size: model({k: v[:size] for k, v in eager_inputs.items()})
    t = interleaved_p50(runners, (1, big), args.rounds, args.runs)
    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
              "rounds": args.rounds, "median_ms": {k: round(float(np.median(v)), 3) for k, v in t.items()},
              f"speedup_vs_fp32_onnx_batch_{big}": {n: round(float(np.median(t[f"fp32@{big}"] / t[f"{n}@{big}"])), 2)
                                                     for n in names},
              "speedup_vs_pytorch_batch_1": {n: round(float(np.median(t["pytorch@1"] / t[f"{n}@1"])), 2) for n in names}}
    write_json_atomic(REPORT, report)
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
