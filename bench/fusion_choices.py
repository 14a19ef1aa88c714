"""Compare the fusion choices (and the single-modality baselines) on the built-in corpus.

Trains one model per ``model.fusion`` choice with every other param as in params.yaml, on the
features the pipeline built (data/features), and scores each on the **test** split, which neither
training nor early stopping looked at. Writes reports/fusion_choices.json and prints a table.

    python -m bench.fusion_choices [--baselines] [--fusions concat gated attention]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from mmpipe import params
from mmpipe.features.loader import FeatureSet
from mmpipe.io import write_json_atomic
from mmpipe.modalities import names
from mmpipe.names import FUSIONS
from mmpipe.training.model_io import load_model
from mmpipe.training.train import accuracy, train

FEATURES, REPORT = Path("data/features"), Path("reports/fusion_choices.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", nargs="+", default=list(FUSIONS))
    parser.add_argument("--baselines", action="store_true", help="also train image-, text- and audio-only models")
    args = parser.parse_args()

    cfg, model_cfg = params.load("train"), params.load("model")
    runs = {f"fusion_{f}": (f, list(names())) for f in args.fusions}
    if args.baselines:
        runs |= {f"baseline_{m}": (model_cfg.fusion, [m]) for m in names()}
    test = FeatureSet(FEATURES, split="test")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fusion, modalities) in runs.items():
            result = train(cfg, model_cfg.model_copy(update={"fusion": fusion}), FEATURES, modalities,
                           Path(tmp) / name, Path(tmp) / "checkpoints")
            model = load_model(Path(tmp) / name).to(result["metrics"]["device"])
            rows[name] = result["metrics"] | {
                "test_accuracy": accuracy(model, test, modalities, torch.device(result["metrics"]["device"]))}
            m = rows[name]
            print(f"{name:18s} val {m['val_accuracy']:.4f}  test {m['test_accuracy']:.4f}  "
                  f"best epoch {m['best_epoch']:2d}/{m['epochs_run']:2d}  {m['seconds']:.0f}s", flush=True)
    write_json_atomic(REPORT, {"machine": f"{platform.processor() or platform.machine()}, "
                                          f"{torch.get_num_threads()} torch threads",
                               "test_samples": len(test), "runs": rows})
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
