"""Label efficiency: how far a few labels go, with and without cross-modal pretraining (the pretrain stage).

Pretrains once on every train row (params.yaml's pretrain section, enabled), then trains the fusion model with
1, 5, 10, 25 and 100 % of the train split's labels (``train.label_fraction``: seeded, per class), once from
scratch and once from the aligned encoders, everything else as in params.yaml; scores each on the **test**
split (never seen by training or early stopping). The validation split keeps all its labels (early stopping).

    python -m bench.label_efficiency [--fractions 0.01 0.05 0.1 0.25 1] [--epochs N] [--pretrain-epochs N]

Run it in the repository after `make repro` (data/features), or in a `bench.realistic --keep` copy for the
realistic profile. Writes reports/label_efficiency.json and .csv (fraction, scratch, pretrained: the DVC plot
docs/label_efficiency.csv is a copy of a documented run). Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import csv
import io
import platform
import tempfile
import time
from pathlib import Path

import torch

from mmpipe import params
from mmpipe.features.loader import FeatureSet, feature_modalities
from mmpipe.io import write_bytes_atomic, write_json_atomic
from mmpipe.pretrain.align import pretrain, split_retrieval
from mmpipe.training.model_io import load_model
from mmpipe.training.train import score, train

FEATURES, REPORTS = Path("data/features"), Path("reports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="pretrain.epochs (default: params.yaml's)")
    parser.add_argument("--name", default="label_efficiency", help="reports/<name>.json and .csv")
    args = parser.parse_args()

    train_cfg, model_cfg = params.load("train"), params.load("model")
    pretrain_cfg = params.load("pretrain").model_copy(update={"enabled": True})
    if args.epochs:
        train_cfg = train_cfg.model_copy(update={"epochs": args.epochs})
    if args.pretrain_epochs:
        pretrain_cfg = pretrain_cfg.model_copy(update={"epochs": args.pretrain_epochs})
    modalities = list(feature_modalities(FEATURES))
    test = FeatureSet(FEATURES, split="test")
    headline = test.target.HEADLINE
    labelled = len(FeatureSet(FEATURES, split="train"))
    device = torch.device("cuda" if torch.cuda.is_available() and train_cfg.device != "cpu" else "cpu")

    rows, report = [], {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                        "modalities": modalities, "headline": headline, "train_labelled_rows": labelled,
                        "test_rows": len(test), "fractions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        aligned = Path(tmp) / "aligned"
        pretrained = pretrain(pretrain_cfg, model_cfg, FEATURES, aligned)["metrics"]
        report["pretrain"] = {"seconds": round(time.perf_counter() - tic, 1), "epochs_run": pretrained["epochs_run"],
                              "val_mean_recall@5": pretrained["val_mean_recall@5"], "loss": pretrained["loss"]}
        print(f"pretrain: {report['pretrain']['seconds']:.0f}s, val mean recall@5 {pretrained['val_mean_recall@5']:.3f}")
        # what evaluate reports when pretrain is on: retrieval on the test split, every ordered modality pair
        retrieval = split_retrieval(aligned, FEATURES, "test", device)
        report["test_retrieval"] = {pair: {k: v[k] for k in ("recall@1", "recall@5", "recall@10", "median_rank",
                                                             "chance@5", "rows")}
                                    for pair, v in retrieval["pairs"].items()}
        for pair, v in report["test_retrieval"].items():
            print(f"test retrieval {pair}: recall@5 {v['recall@5']:.3f} (chance {v['chance@5']:.3f}), "
                  f"median rank {v['median_rank']}")
        for fraction in args.fractions:
            figures = {}
            for init, start in (("scratch", None), ("pretrained", aligned)):
                out = Path(tmp) / f"{init}-{fraction}"
                cfg = train_cfg.model_copy(update={"label_fraction": fraction})
                result = train(cfg, model_cfg, FEATURES, modalities, out, None, aligned=start)
                model = load_model(out).to(device)
                figures[init] = {f"test_{headline}": round(score(model, test, modalities, device)[headline], 4),
                                 "seconds": result["metrics"]["seconds"], "epochs_run": result["metrics"]["epochs_run"],
                                 "labelled_rows": result["metrics"].get("labelled_rows", labelled)}
            figures["gain"] = round(figures["pretrained"][f"test_{headline}"] - figures["scratch"][f"test_{headline}"], 4)
            report["fractions"][str(fraction)] = figures
            rows.append({"fraction": fraction, "labelled_rows": figures["scratch"]["labelled_rows"],
                         "scratch": figures["scratch"][f"test_{headline}"],
                         "pretrained": figures["pretrained"][f"test_{headline}"]})
            print(f"{fraction:>6.0%} of the labels ({figures['scratch']['labelled_rows']} rows): test {headline} "
                  f"scratch {figures['scratch'][f'test_{headline}']:.4f}, pretrained "
                  f"{figures['pretrained'][f'test_{headline}']:.4f} ({figures['gain']:+.4f})")
    REPORTS.mkdir(exist_ok=True)
    write_json_atomic(REPORTS / f"{args.name}.json", report)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(REPORTS / f"{args.name}.csv", text.getvalue().encode())
    print(f"wrote {REPORTS / args.name}.json and .csv")


if __name__ == "__main__":
    main()
