"""Distillation: the compress stage's student against the model it ships today, side by side in one run.

Runs compress (params.yaml's section, with ``distill.enabled``) on the trained fusion model into a temporary
folder, then times today's shipped variant (artifacts/compressed/model.onnx, what `make repro` chose), the
fp32 teacher, the student and its int8 form round-robin at batch 1 and 32 (a fixed thread count), and reports
file sizes, MACs, test accuracy (headline metric) for every modality subset, the robustness AUCs and the
ratios: how much smaller and faster the int8 student is than what ships today.

    python -m bench.distill [--init pruned|scratch] [--epochs N] [--rounds 7] [--runs 50]

Run it in the repository after `make repro`. Writes reports/distill.json and prints a markdown table.
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
    parser.add_argument("--epochs", type=int, default=None, help="compress.distill.epochs (default: params.yaml's)")
    parser.add_argument("--init", choices=["pruned", "scratch"], default=None,
                        help="compress.distill.init (default: params.yaml's)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model per round")
    args = parser.parse_args()
    cfg = params.load("compress")
    distill = cfg.distill.model_copy(update={"enabled": True, **({"epochs": args.epochs} if args.epochs else {}),
                                             **({"init": args.init} if args.init else {})})
    cfg = cfg.model_copy(update={"distill": distill})
    today = json.loads(layout.METRICS["compress"].read_text())
    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        metrics = compress(cfg, layout.FEATURES, layout.FUSION, out, clean_dir=layout.CLEAN)
        h, variants = metrics["headline"], metrics["variants"]
        files = {"shipped_today": layout.COMPRESSED / "model.onnx", "teacher_fp32": out / "fp32.onnx",
                 "student": out / "student.onnx", "student_int8": out / "student_int8.onnx"}
        files = {name: path for name, path in files.items() if path.exists()}
        model = load_model(layout.FUSION)
        val = FeatureSet(layout.FEATURES, split="val")
        big = min(32, len(val))
        feeds = onnx_feeds(val.get(np.arange(big)), model)
        sessions = {name: session(path, cfg.threads) for name, path in files.items()}
        runners = {name: (lambda size, sess=sess: sess.run(["logits"], {k: v[:size] for k, v in feeds.items()}))
                   for name, sess in sessions.items()}
        t = interleaved_p50(runners, (1, big), args.rounds, args.runs)
        sizes = {name: path.stat().st_size for name, path in files.items()}
    student = "student_int8" if "student_int8" in files else "student"
    retention = metrics["distill"]["retention"]
    every = "+".join(model.modalities)
    singles = {m: retention[m] for m in model.modalities}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {cfg.threads} threads", "rounds": args.rounds,
        "headline": h, "shipped_today": today["chosen"], "student": student,
        "macs_per_sample": {"teacher_fp32": variants["fp32"]["macs_per_sample"],
                            "shipped_today": today["variants"][today["chosen"]]["macs_per_sample"],
                            "student": variants["student"]["macs_per_sample"],
                            "student_int8": variants["student"]["macs_per_sample"]},
        "init": metrics["distill"]["init"], "macs_share": metrics["distill"]["macs_share"],
        "width_scale": metrics["distill"]["width_scale"],
        "file_bytes": sizes,
        "median_p50_ms": {k: round(float(np.median(v)), 3) for k, v in t.items()},
        f"{student}_smaller_than_shipped_today": round(sizes["shipped_today"] / sizes[student], 2),
        f"{student}_faster_than_shipped_today": {
            f"batch_{size}": round(float(np.median(t[f"shipped_today@{size}"] / t[f"{student}@{size}"])), 2)
            for size in (1, big)},
        f"test_{h}": {"teacher_fp32": variants["fp32"][f"test_{h}"], "shipped_today": today["shipped"][f"test_{h}"],
                      **{name: variants[name][f"test_{h}"] for name in ("student", "student_int8") if name in variants}},
        "all_modalities_minus_teacher": retention[every].get(f"{student}_minus_teacher"),
        "worst_single_modality_minus_teacher": min(r.get(f"{student}_minus_teacher") for r in singles.values()),
        "retention": retention, "robustness": metrics["distill"]["robustness"],
        "distill_seconds": metrics["distill"]["seconds"], "epochs_run": metrics["distill"]["epochs_run"],
        "chosen_with_distill": metrics["chosen"]}
    write_json_atomic(REPORT, report)
    print(f"| model | file | MACs/sample | test {h} | batch 1 p50 ms | batch {big} p50 ms |")
    print("|---|---|---|---|---|---|")
    for name in files:
        macs, acc = report["macs_per_sample"][name], report[f"test_{h}"][name]
        print(f"| {name} | {sizes[name] / 1e3:.0f} kB | {macs / 1e6:.2f} M | {acc:.4f} | "
              f"{report['median_p50_ms'][f'{name}@1']:.3f} | {report['median_p50_ms'][f'{name}@{big}']:.3f} |")
    for key in ("init", f"{student}_smaller_than_shipped_today", f"{student}_faster_than_shipped_today", "macs_share",
                "all_modalities_minus_teacher", "worst_single_modality_minus_teacher", "robustness"):
        print(f"{key}: {report[key]}")


if __name__ == "__main__":
    main()
