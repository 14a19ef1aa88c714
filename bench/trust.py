"""What "how far to trust it" costs: the predictor with and without its calibration, side by side, and the share
of the evaluate stage's time that calibration, conformal sets and Shapley attribution take.

    python -m bench.trust --rounds 20     # after `make repro`: reads artifacts/deploy, data/, models/

- predictor: one raw test sample (every modality present) read and answered by the bundle's predictor
  (``Predictor.predict_rows``: decoding, features, the ONNX model, the answer) with its calibration (the
  default: temperature-scaled probabilities and the conformal set) and with ``calibrated=False`` (the raw
  softmax, no set), timed round-robin, ``--rounds`` times; the median per-round ratio of the p50s.
- evaluate: ``evaluate()`` with params.yaml's evaluate section, the time spent in ``how_far_to_trust``
  (validation split under every subset, the fits, the test assessment, Shapley) against the rest.

Writes reports/trust.json. Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from mmpipe import params
from mmpipe.deploy.verify import load_predictor, raw_test_items
from mmpipe.evaluate import evaluate as evaluate_module
from mmpipe.features.loader import FeatureSet
from mmpipe.io import write_json_atomic
from mmpipe.timing import latency_ms

BUNDLE, FEATURES, RAW, CLEAN, MODELS = (Path(p) for p in ("artifacts/deploy", "data/features", "data/raw", "data/clean",
                                                           "models"))
REPORT = Path("reports/trust.json")


def predictor_latency(rounds: int, runs: int, threads: int) -> dict:
    module = load_predictor(BUNDLE)
    with_sets = module.Predictor(BUNDLE, threads=threads)
    without = module.Predictor(BUNDLE, threads=threads, calibrated=False)
    modalities = with_sets.modalities
    test = FeatureSet(FEATURES, split="test")
    items = raw_test_items(RAW, CLEAN, test.sample_ids, modalities)
    item = next((it for it in items if all(v is not None for v in it.values())), items[0])
    if "alpha" not in next(with_sets.predict_rows([item])):
        raise SystemExit(f"{BUNDLE}: the bundle has no calibration (built before it: re-run dvc repro)")
    timings: dict[str, list[float]] = {"calibrated": [], "raw": []}
    pair = [("calibrated", with_sets), ("raw", without)]
    for round_ in range(rounds):
        for name, predictor in (pair if round_ % 2 == 0 else pair[::-1]):  # alternate who goes first
            timings[name].append(latency_ms(lambda p=predictor: next(p.predict_rows([item])), runs)["p50"])
    t = {k: np.array(v) for k, v in timings.items()}
    return {"p50_ms": {k: round(float(np.median(v)), 3) for k, v in t.items()},
            "ratio_calibrated_over_raw": round(float(np.median(t["calibrated"] / t["raw"])), 4),
            "rounds": rounds, "runs_per_round": runs}


def evaluate_share() -> dict:
    cfg = params.load("evaluate")
    spent = []
    inner = evaluate_module.how_far_to_trust

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    evaluate_module.how_far_to_trust = timed
    try:
        started = time.perf_counter()
        evaluate_module.evaluate(cfg, FEATURES, CLEAN, MODELS, progress=lambda line: None)
        total = time.perf_counter() - started
    finally:
        evaluate_module.how_far_to_trust = inner
    return {"evaluate_s": round(total, 2), "trust_s": round(spent[0], 2),
            "growth_over_evaluate_without_it": round(spent[0] / (total - spent[0]), 4),
            "noise_levels": len(cfg.noise_levels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=50, help="timed predictions per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"{args.threads} ONNX Runtime threads",
              "predictor_one_raw_sample": predictor_latency(args.rounds, args.runs, args.threads),
              "evaluate": evaluate_share()}
    write_json_atomic(REPORT, report)
    p, e = report["predictor_one_raw_sample"], report["evaluate"]
    print(f"predictor, one raw sample: p50 {p['p50_ms']['calibrated']:.2f} ms calibrated vs {p['p50_ms']['raw']:.2f} ms "
          f"raw: x{p['ratio_calibrated_over_raw']:.3f}")
    print(f"evaluate: {e['evaluate_s']:.1f} s, of which calibration + conformal + Shapley {e['trust_s']:.1f} s "
          f"(+{100 * e['growth_over_evaluate_without_it']:.1f} %)")
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
