"""Scaling curve: every stage's wall time and peak memory at several dataset sizes, with fitted slopes.

    python -m bench.scaling --samples 1000 4000 16000                 # built-in corpus, CPU
    python -m bench.scaling --samples 1000 4000 16000 64000 --profile realistic   # e.g. on a GPU machine

Each size is one ``bench.realistic`` run (the whole ``dvc repro`` in a temporary copy) with a fixed,
small training budget (``--set`` defaults: 2 epochs, no baselines, 1 fine-tuning epoch, no gate), so that time
per epoch, not early stopping, is what scales. The slope is that of log(time) against log(n) between
the two largest sizes (1 = linear; start-up costs make it smaller at small n); ``per_1k_s`` is the
extra time per 1,000 samples over that step. Writes reports/bench_scaling.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench.realistic import ROOT, run

BUDGET = ["train.epochs=2", "train.baselines=false", "compress.prune.finetune_epochs=1",
          "evaluate.gates.min_accuracy=null"]  # 2 epochs on 1,000 samples do not pass the default gate


def slopes(results: list[dict]) -> dict[str, dict]:
    """Per stage: log-log slope of wall time and of peak RSS between the two largest sizes."""
    small, large = results[-2], results[-1]
    ratio = math.log(large["samples"] / small["samples"])
    out = {}
    for stage, f in large["stages"].items():
        g = small["stages"].get(stage)
        if not g or not g.get("wall_s") or not f.get("wall_s"):
            continue
        out[stage] = {"time_slope": round(math.log(f["wall_s"] / g["wall_s"]) / ratio, 2),
                      "rss_slope": round(math.log(f["peak_rss_mb"] / g["peak_rss_mb"]) / ratio, 2),
                      "per_1k_s": round((f["wall_s"] - g["wall_s"]) / (large["samples"] - small["samples"]) * 1000, 2)}
    return out


def table(results: list[dict], fitted: dict[str, dict]) -> str:
    sizes = [r["samples"] for r in results]
    head = "| stage | " + " | ".join(f"{n:,} s (RSS MB)" for n in sizes) + " | time slope | RSS slope | s per 1k |"
    lines = [head, "|---" * (len(sizes) + 4) + "|"]
    for stage in results[-1]["stages"]:
        cells = []
        for r in results:
            f = r["stages"].get(stage, {})
            cells.append(f"{f.get('wall_s', '—')} ({f.get('peak_rss_mb', '—')})")
        s = fitted.get(stage, {})
        lines.append(f"| {stage} | " + " | ".join(cells)
                     + f" | {s.get('time_slope', '—')} | {s.get('rss_slope', '—')} | {s.get('per_1k_s', '—')} |")
    lines.append("| **dvc repro** | " + " | ".join(f"**{r['dvc_repro_wall_s']}**" for r in results) + " | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--profile", choices=["realistic", "builtin"], default="builtin")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"params.yaml overrides after {' '.join(BUDGET)}")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--until", default="export", help="the last stage dvc repro runs (the tests': clean)")
    args = parser.parse_args()
    results = []
    for n in sorted(args.samples):
        results.append(run(n, args.profile, [*BUDGET, *args.set], args.until))
        print(f"{n}: dvc repro {results[-1]['dvc_repro_wall_s']} s", flush=True)
    fitted = slopes(results) if len(results) > 1 else {}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scaling.json").write_text(json.dumps({"runs": results, "slopes": fitted}, indent=2) + "\n")
    (args.out / "bench_scaling.md").write_text(table(results, fitted) + "\n")
    print(table(results, fitted))


if __name__ == "__main__":
    main()
