"""The evaluate stage's outputs besides metrics/eval.json: DVC plot data (CSV) and a human report
(markdown + PNG figures drawn with matplotlib)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on CI machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_plot_data(tables: dict, folder: Path) -> None:
    """CSV files for `dvc plots` (declared in dvc.yaml): confusion pairs, reliability, missing, robustness."""
    names = tables["label_names"]
    _csv(folder / "confusion.csv", [{"actual": names[a], "predicted": names[p]}
                                    for a, p in zip(tables["labels"], tables["predicted"])])
    _csv(folder / "reliability.csv", tables["reliability"])
    _csv(folder / "missing.csv", tables["missing"])
    # one file per model, columns named by corruption: a plot in dvc.yaml may then name a baseline
    # file that is absent (train.baselines: false) without DVC dropping the whole plot
    for modality, rows in tables["robustness"].items():
        for model in ("fused", "baseline"):
            series = [{"level": r["level"]} | {k.split("_", 1)[1]: v for k, v in r.items() if k.startswith(f"{model}_")}
                      for r in rows]
            if len(series[0]) > 1:
                _csv(folder / f"robustness_{modality}_{model}.csv", series)


def _figures(tables: dict, folder: Path) -> dict[str, str]:
    figures = {}
    names = tables["label_names"]

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    matrix = tables["confusion"]
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > matrix.max() / 2 else "black")
    figures["confusion"] = "confusion.png"

    fig2, ax2 = plt.subplots(figsize=(4.5, 4.5))
    rel = tables["reliability"]
    ax2.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    ax2.plot([r["confidence"] for r in rel], [r["accuracy"] for r in rel], marker="o", label="model")
    ax2.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability diagram")
    ax2.legend(loc="upper left")
    figures["reliability"] = "reliability.png"

    robustness = tables["robustness"]
    fig3, axes = plt.subplots(1, len(robustness), figsize=(4.2 * len(robustness), 3.8), squeeze=False)
    for ax3, (modality, rows) in zip(axes[0], robustness.items()):
        levels = [r["level"] for r in rows]
        for key in rows[0]:
            if key != "level":
                model, corruption = key.split("_", 1)
                ax3.plot(levels, [r[key] for r in rows], marker=".", ls="-" if model == "fused" else "--",
                         label=f"{model}: {corruption.replace('_', ' ')}")
        ax3.set(title=f"{modality} corrupted", xlabel="noise level", ylabel="test accuracy", ylim=(0, 1))
        ax3.legend(fontsize=7)
    figures["robustness"] = "robustness.png"

    fig4, ax4 = plt.subplots(figsize=(5.5, 3.2))
    missing = tables["missing"]
    ax4.barh([r["modalities"] for r in missing], [r["accuracy"] for r in missing])
    ax4.set(xlim=(0, 1), xlabel="test accuracy", title="Fused model with only these modalities")
    ax4.invert_yaxis()
    figures["missing"] = "missing.png"

    for name, f in zip(figures, (fig, fig2, fig3, fig4)):
        f.tight_layout()
        f.savefig(folder / figures[name], dpi=110)
        plt.close(f)
    return figures


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def report_markdown(metrics: dict, tables: dict, gates_failed: list[str], figures_dir: Path, link_prefix: str) -> str:
    """The markdown report; its figures are drawn into ``figures_dir`` and linked as ``link_prefix/<name>.png``."""
    figures = _figures(tables, figures_dir)
    rel = link_prefix
    t, eff = metrics["test"], metrics["efficiency"]
    lines = [
        "# Evaluation report",
        "",
        f"The fused model ({' + '.join(metrics['modalities'])}) and the single-modality baselines, scored on the "
        f"**{metrics['split']}** split ({t['samples']:,} samples) that neither training nor early stopping saw.",
        "",
        "## Verdict",
        "",
        ("All quality gates pass." if not gates_failed else
         "**Quality gates failed** — the pipeline stops here; nothing is compressed or exported:"),
        *[f"- {line}" for line in gates_failed],
        "",
        "## Headline",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {_pct(t['accuracy'])} |",
        f"| macro F1 (each class counts the same) | {_pct(t['f1_macro'])} |",
        f"| weighted F1 (classes weighted by support) | {_pct(t['f1_weighted'])} |",
        f"| macro precision / recall | {_pct(t['precision_macro'])} / {_pct(t['recall_macro'])} |",
        f"| expected calibration error (0 = confidence matches accuracy) | {t['ece']:.4f} |",
        "",
        "## Does fusion help?",
        "",
        "Accuracy of models that see a single modality, trained by the same trainer:",
        "",
        "| model | accuracy |",
        "|---|---|",
        f"| **fused** | **{_pct(t['accuracy'])}** |",
        *[f"| {m} only | {_pct(b['accuracy'])} |" for m, b in metrics["baselines"].items()],
        "",
        (f"Fusion gain over the best single modality ({metrics['best_baseline']}): "
         f"**{100 * metrics['fusion_gain']:+.2f} points**." if metrics["fusion_gain"] is not None
         else "No baselines were trained (`train.baselines: false`), so there is no fusion gain to report."),
        "",
        "## When modalities are missing",
        "",
        "The fused model with only these modalities given (the others masked as missing):",
        "",
        f"![missing modalities]({rel}/{figures['missing']})",
        "",
        "| modalities available | accuracy |",
        "|---|---|",
        *[f"| {name} | {_pct(v['accuracy'])} |" for name, v in metrics["missing"].items()],
        "",
        "## Robustness to noise",
        "",
        "One modality corrupted at a time, at noise levels from 0 (clean) to 1 (image: Gaussian noise "
        "of standard deviation = level x full range, and a black square covering that share of the "
        "image; audio: white noise from 30 dB SNR down to -10 dB; text: each character replaced, "
        "deleted or doubled with that probability). *Relative robustness* is the area under the "
        "accuracy-vs-level curve (1.0 = unaffected and perfect). The baseline of a modality sees only "
        "that modality, so it has nothing to fall back on.",
        "",
        f"![robustness]({rel}/{figures['robustness']})",
        "",
        "| corrupted modality | corruption | fused | baseline |",
        "|---|---|---|---|",
    ]
    for modality, r in metrics["robustness"].items():
        for corruption, c in r.items():
            if isinstance(c, dict):
                base = "–" if c["baseline_relative"] is None else f"{c['baseline_relative']:.3f}"
                lines.append(f"| {modality} | {corruption.replace('_', ' ')} | {c['relative']:.3f} | {base} |")
    lines += [
        "",
        "## Per class",
        "",
        f"![confusion matrix]({rel}/{figures['confusion']})",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
        *[f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
          for name, c in metrics["per_class"].items()],
        "",
        "## Calibration",
        "",
        f"![reliability diagram]({rel}/{figures['reliability']})",
        "",
        "Points on the diagonal: when the model says 90 %, it is right 90 % of the time.",
        "",
        "## Efficiency",
        "",
        f"{eff['parameters']:,} parameters. PyTorch inference on {eff['device']} ({eff['threads']} threads), "
        "after warm-up:",
        "",
        "| batch | p50 | p95 |",
        "|---|---|---|",
        *[f"| {k.split('_')[1]} | {v['p50']:.2f} ms | {v['p95']:.2f} ms |" for k, v in eff["latency_ms"].items()],
        "",
        "Every number here is in `metrics/eval.json` (`dvc metrics show`), the curves in `plots/eval/` "
        "(`dvc plots show`), and all of it in the MLflow run of this stage.",
        "",
    ]
    return "\n".join(lines)
