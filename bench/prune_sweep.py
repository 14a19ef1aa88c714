"""Structured pruning amount x fine-tune epochs: accuracy cost and speed-up of the pruned and int8 variants.

Runs the compress chain (mmpipe.compress.compress) on the trained models/fusion for each
``amount:epochs`` pair, every other compress param as in params.yaml, and prints each variant's
validation accuracy change and batch-32 speed-up against the fp32 ONNX export of the same run.

    python -m bench.prune_sweep 0.3:3 0.5:6 0.55:8 0.6:8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from mmpipe import params
from mmpipe.compress.compress import compress
from mmpipe.io import write_json_atomic

REPORT = Path("reports/prune_sweep.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="amount:finetune_epochs, e.g. 0.5:6")
    args = parser.parse_args()
    base = params.load("compress").model_dump()
    rows = {}
    for setting in args.settings:
        amount, epochs = setting.split(":")
        cfg = params.validate("compress", base | {"prune": base["prune"] | {"amount": float(amount),
                                                                             "finetune_epochs": int(epochs)},
                                                  "distill": base["distill"] | {"enabled": False}})  # pruning only
        with tempfile.TemporaryDirectory() as tmp:
            result = compress(cfg, Path("data/features"), Path("models/fusion"), Path(tmp), progress=lambda line: None)
        fp32 = result["variants"]["fp32"]
        rows[setting] = {"chosen": result["chosen"], "base_for_int8": result["base_for_int8"], "variants": {
            name: {"val_accuracy_change": round(v["val_accuracy"] - fp32["val_accuracy"], 4),
                   "macs_ratio": round(v["macs_per_sample"] / fp32["macs_per_sample"], 3),
                   "batch_32_speedup": round(fp32["latency_ms"]["batch_32"]["p50"] / v["latency_ms"]["batch_32"]["p50"], 2)}
            for name, v in result["variants"].items() if name != "fp32"}}
        print(setting, rows[setting], flush=True)
    write_json_atomic(REPORT, rows)
    print(f"-> {REPORT}")


if __name__ == "__main__":
    main()
