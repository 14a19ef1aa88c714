"""Distillation: the compress stage's student against the model it ships today, side by side in one run, over
several seeds.

Runs compress (params.yaml's section, with ``distill.enabled``) on the trained fusion model once per seed
(``compress.seed`` 0, 1, ...: the student's batches, dropout masks and calibration rows differ; the teacher and
the split do not) into a temporary folder, then times today's shipped variant (artifacts/compressed/model.onnx,
what `make repro` chose), the fp32 teacher, and per seed the int8 student and that run's own int8 model (today's
recipe: int8 of the pruned model, its layers chosen by the same latency probes in the same run as the
student's) round-robin at batch 1 and 32 (a fixed thread count). Reports file sizes, MACs, test accuracy
(headline metric) for every modality subset per seed and its mean / min / max over the seeds, the robustness
AUCs and the ratios: how much smaller and faster the int8 student is than what ships today. One seed cannot
tell a 1-point difference on a 593-row subset from chance (docs/benchmarks.md "Distillation"): the mean can.

    python -m bench.distill [--seeds 3] [--first-seed 0] [--init pruned|scratch] [--epochs N] [--rounds 7]
                            [--runs 50] [--batch-1-runs 500]

Run it in the repository after `make repro`. Writes reports/distill.json and prints markdown tables.
Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.compressed_variants import interleaved_p50
from mmpipe import layout, params
from mmpipe.compress.compress import compress
from mmpipe.compress.onnx_model import onnx_feeds, session
from mmpipe.features.loader import FeatureSet
from mmpipe.io import write_json_atomic
from mmpipe.training.model_io import load_model

REPORT = Path("reports/distill.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="compress runs, at compress.seed 0, 1, ... (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="the first run's compress.seed (more seeds of the "
                        "same recipe in a second run: --first-seed 3)")
    parser.add_argument("--epochs", type=int, default=None, help="compress.distill.epochs (default: params.yaml's)")
    parser.add_argument("--init", choices=["pruned", "scratch"], default=None,
                        help="compress.distill.init (default: params.yaml's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model per round at batch 32")
    # a batch-1 call (~0.2 ms) is mostly fixed cost and its p50 over 50 calls moved 10 % between rounds on a shared
    # 2-core VM: more calls are cheap and steady it
    parser.add_argument("--batch-1-runs", type=int, default=500, help="timed runs per model per round at batch 1")
    args = parser.parse_args()
    cfg = params.load("compress")
    distill = cfg.distill.model_copy(update={"enabled": True, **({"epochs": args.epochs} if args.epochs else {}),
                                             **({"init": args.init} if args.init else {})})
    cfg = cfg.model_copy(update={"distill": distill})
    today = json.loads(layout.METRICS["compress"].read_text())
    torch.set_num_threads(cfg.threads)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            out = Path(tmp) / f"seed{seed}"
            out.mkdir()
            runs[seed] = compress(cfg.model_copy(update={"seed": seed}), layout.FEATURES, layout.FUSION, out,
                                  clean_dir=layout.CLEAN)
        files = {"shipped_today": layout.COMPRESSED / "model.onnx",
                 "teacher_fp32": Path(tmp) / f"seed{args.first_seed}" / "fp32.onnx"}
        for seed in runs:
            files |= {f"student_int8@seed{seed}": Path(tmp) / f"seed{seed}" / "student_int8.onnx",
                      f"int8@seed{seed}": Path(tmp) / f"seed{seed}" / "int8.onnx"}
        files = {name: path for name, path in files.items() if path.exists()}
        model = load_model(layout.FUSION)
        val = FeatureSet(layout.FEATURES, split="val")
        big = min(32, len(val))
        feeds = onnx_feeds(val.get(np.arange(big)), model)
        sessions = {name: session(path, cfg.threads) for name, path in files.items()}
        runners = {name: (lambda size, sess=sess: sess.run(["logits"], {k: v[:size] for k, v in feeds.items()}))
                   for name, sess in sessions.items()}
        t = interleaved_p50(runners, (1, big), args.rounds, {1: args.batch_1_runs, big: args.runs})
        sizes = {name: path.stat().st_size for name, path in files.items()}
    report = summary(runs, today, model.modalities, sizes, t, big)
    report |= {"machine": f"{platform.processor() or platform.machine()}, {cfg.threads} threads", "rounds": args.rounds,
               "runs_per_round": {"batch_1": args.batch_1_runs, f"batch_{big}": args.runs}}
    write_json_atomic(REPORT, report)
    print_tables(report, big)


def ratio(t: dict[str, np.ndarray], slow: str, fast: str, size: int) -> float:
    """How many times faster ``fast`` is than ``slow`` at ``size``: the median of the per-round ratios."""
    return round(float(np.median(t[f"{slow}@{size}"] / t[f"{fast}@{size}"])), 2)


def median_over_seeds(per_seed: dict[int, dict], key: str, size: str | None = None) -> float | None:
    """The median of a per-seed ratio (None when no seed has it: no int8 student was written)."""
    values = [row[key] if size is None else row[key][size] for row in per_seed.values() if key in row]
    return round(float(np.median(values)), 2) if values else None


def summary(runs: dict[int, dict], today: dict, modalities: list[str], sizes: dict[str, int],
            t: dict[str, np.ndarray], big: int) -> dict:
    first = runs[min(runs)]
    h, variants = first["headline"], first["variants"]
    student = "student_int8" if "student_int8" in variants else "student"
    every = "+".join(modalities)
    per_seed = {}
    for seed, metrics in runs.items():
        row = {"macs_share": metrics["distill"]["macs_share"], "width_scale": metrics["distill"]["width_scale"],
               "epochs_run": metrics["distill"]["epochs_run"], "distill_seconds": metrics["distill"]["seconds"],
               f"test_{h}": {name: metrics["variants"][name][f"test_{h}"]
                             for name in ("student", "student_int8", "int8") if name in metrics["variants"]},
               # a seed whose int8 student was not written (over the accuracy budget): its fp32 student's figures
               "minus_teacher": {subset: r.get(f"{student}_minus_teacher", r["student_minus_teacher"])
                                 for subset, r in metrics["distill"]["retention"].items()},
               "minus_teacher_of": student if f"{student}_minus_teacher" in metrics["distill"]["retention"][every]
               else "student",
               "robustness": metrics["distill"]["robustness"], "chosen_with_distill": metrics["chosen"]}
        name = f"student_int8@seed{seed}"
        if name in sizes:
            row["smaller_than_shipped_today"] = round(sizes["shipped_today"] / sizes[name], 2)
            row["faster_than_shipped_today"] = {f"batch_{s}": ratio(t, "shipped_today", name, s) for s in (1, big)}
            if f"int8@seed{seed}" in sizes:  # today's recipe, its int8 layers probed in the same run
                row["smaller_than_same_run_int8"] = round(sizes[f"int8@seed{seed}"] / sizes[name], 2)
                row["faster_than_same_run_int8"] = {f"batch_{s}": ratio(t, f"int8@seed{seed}", name, s)
                                                    for s in (1, big)}
        per_seed[seed] = row
    subsets = list(first["distill"]["retention"])
    spread = {subset: {"mean": round(float(np.mean([r["minus_teacher"][subset] for r in per_seed.values()])), 4),
                       "min": min(r["minus_teacher"][subset] for r in per_seed.values()),
                       "max": max(r["minus_teacher"][subset] for r in per_seed.values()),
                       "teacher": first["distill"]["retention"][subset]["teacher"]} for subset in subsets}
    return {
        "headline": h, "student": student, "init": first["distill"]["init"], "seeds": len(runs),
        "shipped_today": today["chosen"],
        "macs_per_sample": {"teacher_fp32": variants["fp32"]["macs_per_sample"],
                            "shipped_today": today["variants"][today["chosen"]]["macs_per_sample"],
                            "student": variants["student"]["macs_per_sample"]},
        "macs_share": first["distill"]["macs_share"], "width_scale": first["distill"]["width_scale"],
        "file_bytes": sizes, "median_p50_ms": {k: round(float(np.median(v)), 3) for k, v in t.items()},
        f"test_{h}": {"teacher_fp32": variants["fp32"][f"test_{h}"], "shipped_today": today["shipped"][f"test_{h}"]},
        "minus_teacher_over_seeds": spread,
        "all_modalities_minus_teacher_mean": spread[every]["mean"],
        "worst_single_modality_minus_teacher_mean": min(spread[m]["mean"] for m in modalities),
        f"{student}_smaller_than_shipped_today_median": median_over_seeds(per_seed, "smaller_than_shipped_today"),
        **{f"{student}_{key}_median": {f"batch_{s}": median_over_seeds(per_seed, key, f"batch_{s}") for s in (1, big)}
           for key in ("faster_than_shipped_today", "faster_than_same_run_int8")},
        "per_seed": per_seed}


def print_tables(report: dict, big: int) -> None:
    h = report["headline"]
    print(f"| model | file | batch 1 p50 ms | batch {big} p50 ms |")
    print("|---|---|---|---|")
    for name, size in report["file_bytes"].items():
        print(f"| {name} | {size / 1e3:.0f} kB | {report['median_p50_ms'][f'{name}@1']:.3f} | "
              f"{report['median_p50_ms'][f'{name}@{big}']:.3f} |")
    print(f"\n{report['student']} minus teacher, test {h} points over {report['seeds']} seeds:\n")
    print("| subset | teacher | mean | min | max |")
    print("|---|---|---|---|---|")
    for subset, s in report["minus_teacher_over_seeds"].items():
        print(f"| {subset} | {100 * s['teacher']:.2f} % | {100 * s['mean']:+.2f} | {100 * s['min']:+.2f} | "
              f"{100 * s['max']:+.2f} |")
    student = report["student"]
    for key in ("init", "macs_share", "all_modalities_minus_teacher_mean", "worst_single_modality_minus_teacher_mean",
                f"{student}_smaller_than_shipped_today_median", f"{student}_faster_than_shipped_today_median",
                f"{student}_faster_than_same_run_int8_median"):
        print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
