"""Does the bundle's drift monitor fire on shifted data, stay quiet on data like the training data, and name the
right modality? Measured on the pipeline's own outputs, out of sample.

    python -m bench.drift --windows 200      # after `make repro`: reads artifacts/deploy, data/, models/

The reference is the train split's statistics as the bundle's predictor computes them (as export writes it),
its threshold calibrated on windows of the **validation** split only (export uses validation + test); every
figure below is then measured on windows of ``--window-rows`` rows drawn from the **test** split:

- false alarms: unchanged test rows;
- power and naming, one shift at a time, applied to the decoded test signals and featurised as preprocess
  does: image brightness x0.5, audio noise at -10 dB SNR, 30 % character typos in the text, and a shift of
  2 standard deviations in one tabular column (when the data has metadata).

Writes reports/drift.json and prints a table. Times are not the point here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mmpipe import params
from mmpipe.compress.onnx_model import onnx_feeds
from mmpipe.deploy.export import split_statistics
from mmpipe.deploy.verify import load_predictor
from mmpipe.evaluate.evaluate import SplitInputs
from mmpipe.io import write_json_atomic
from mmpipe.modalities.audio import white_noise
from mmpipe.modalities.text import typos
from mmpipe.training.model_io import load_model
from mmpipe.trust import drift

BUNDLE, FEATURES, CLEAN, MODEL = (Path(p) for p in ("artifacts/deploy", "data/features", "data/clean", "models/fusion"))
REPORT = Path("reports/drift.json")


def darker(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels.astype(np.float32) * 0.5).astype(np.uint8)


def column_shift(cells):
    """+2 standard deviations (of its present values here) in the first numeric column."""
    if cells.k:
        present = cells.numeric[:, cells.k] == 0
        spread = float(cells.numeric[present, 0].std()) if present.any() else 1.0
        cells.numeric[present, 0] += 2.0 * spread
    return cells


def shifts(modalities: list[str], rng: np.random.Generator) -> dict[str, tuple[str, object]]:
    """name -> (the modality it changes, the change of its decoded signal)."""
    out = {"image brightness x0.5": ("image", darker),
           "audio SNR -10 dB": ("audio", lambda clips: white_noise(clips, 1.0, rng)),
           "text 30 % typos": ("text", lambda texts: typos(texts, 0.3, rng)),
           "tabular column +2 sd": ("tabular", column_shift)}
    return {name: spec for name, spec in out.items() if spec[0] in modalities}


def windows_of(reference: dict, stats: dict[str, np.ndarray], window_rows: int, count: int,
               rng: np.random.Generator) -> list[dict]:
    n = len(next(iter(stats.values())))
    return [drift.score(reference, {k: v[rows] for k, v in stats.items()})
            for rows in (rng.integers(0, n, window_rows) for _ in range(count))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200, help="test windows per condition")
    parser.add_argument("--window-rows", type=int, default=None, help="rows per window (default: export.monitor's)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    args = parser.parse_args()
    cfg = params.load("export").monitor
    window_rows = args.window_rows or cfg.window_rows
    model = load_model(MODEL)
    predictor = load_predictor(args.bundle).Predictor(args.bundle)
    modalities = list(model.modalities)
    train = split_statistics(predictor, model, FEATURES, ["train"])
    val = split_statistics(predictor, model, FEATURES, ["val"])
    reference = drift.fit({k: v for k, v in train.items() if v[0]}, {k: v for k, (_, v) in val.items()},
                          window_rows, cfg.windows, cfg.false_alarm)
    test = SplitInputs(FEATURES, CLEAN, "test")
    rng = np.random.default_rng(0)

    def statistics(tensors: dict) -> dict[str, np.ndarray]:
        with torch.no_grad():
            feeds = onnx_feeds(tensors, model)
        return {k: v for k, (_, v) in predictor.statistics(feeds).items()}

    conditions = {"none (test rows as they are)": (None, test.tensors)}
    for name, (modality, change) in shifts(modalities, rng).items():
        conditions[name] = (modality, test.transformed(modality, change))
    report = {"window_rows": window_rows, "windows": args.windows, "test_rows": len(test),
              "threshold": reference["threshold"], "false_alarm_target": cfg.false_alarm,
              "false_alarm_on_validation_windows": reference["false_alarm_measured"], "conditions": {}}
    for name, (modality, tensors) in conditions.items():
        verdicts = windows_of(reference, statistics(tensors), window_rows, args.windows, np.random.default_rng(1))
        fired = [v for v in verdicts if v["drifted"]]
        row = {"alarm_rate": len(fired) / len(verdicts)}
        if modality:
            row["named_right"] = (sum(v["modality"] == modality for v in fired) / len(fired)) if fired else None
        named = {}
        for v in fired:
            named[v["statistic"]] = named.get(v["statistic"], 0) + 1
        row["statistics_named"] = dict(sorted(named.items(), key=lambda kv: -kv[1]))
        report["conditions"][name] = row
    write_json_atomic(REPORT, report)
    print(f"threshold {reference['threshold']:.3f} (calibrated on validation windows), {window_rows}-row windows "
          f"from {len(test)} test rows, {args.windows} per condition:")
    for name, row in report["conditions"].items():
        what = "false alarms" if "named_right" not in row else "power"
        named = "" if row.get("named_right") is None else f", right modality named {row['named_right']:.0%}"
        print(f"  {name:30s} {what} {row['alarm_rate']:.1%}{named}")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
