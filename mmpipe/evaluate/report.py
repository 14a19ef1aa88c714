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


HEADLINE_NAMES = {"accuracy": "accuracy", "r2": "R²", "f1_micro": "micro-F1"}


def write_plot_data(tables: dict, folder: Path) -> None:
    """CSV files for `dvc plots` (declared in dvc.yaml): by target type, confusion pairs and reliability
    (category), true vs predicted values with residuals (number), pooled tag reliability (set); for every
    type the headline metric with only some modalities (missing) and under noise (robustness)."""
    names = tables["label_names"]
    if tables["target"] == "category":
        _csv(folder / "confusion.csv", [{"actual": names[a], "predicted": names[p]}
                                        for a, p in zip(tables["labels"], tables["predicted"])])
    if tables["target"] == "number":
        _csv(folder / "predictions.csv", [{"actual": float(t), "predicted": float(p), "residual": float(p - t)}
                                          for t, p in zip(tables["truth"], tables["predicted"])])
    if tables.get("reliability"):
        _csv(folder / "reliability.csv", tables["reliability"])
    if tables.get("reliability_calibrated"):  # after temperature scaling (per availability pattern)
        _csv(folder / "reliability_calibrated.csv", tables["reliability_calibrated"])
    _csv(folder / "missing.csv", tables["missing"])
    if tables.get("coverage"):  # conformal coverage per availability pattern, and one threshold's for comparison
        _csv(folder / "coverage.csv", tables["coverage"])
    if tables.get("attribution"):
        _csv(folder / "attribution.csv", tables["attribution"])
    # one file per model, columns named by corruption: a plot in dvc.yaml may then name a baseline
    # file that is absent (train.baselines: false) without DVC dropping the whole plot
    for modality, rows in tables["robustness"].items():
        for model in ("fused", "baseline"):
            series = [{"level": r["level"]} | {k.split("_", 1)[1]: v for k, v in r.items() if k.startswith(f"{model}_")}
                      for r in rows]
            if len(series[0]) > 1:
                _csv(folder / f"robustness_{modality}_{model}.csv", series)


def _target_figures(tables: dict) -> dict[str, plt.Figure]:
    """The figures of the target type: confusion matrix (category), reliability (category, set: pooled over
    tags), predicted vs true values and residuals (number)."""
    figures = {}
    names = tables["label_names"]
    if "confusion" in tables:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        matrix = tables["confusion"]
        ax.imshow(matrix, cmap="Blues")
        ax.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names,
               xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > matrix.max() / 2 else "black")
        figures["confusion"] = fig
    if tables.get("reliability"):
        fig2, ax2 = plt.subplots(figsize=(4.5, 4.5))
        rel = tables["reliability"]
        observed = "accuracy" if "accuracy" in rel[0] else "frequency"
        ax2.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
        ax2.plot([r["confidence"] for r in rel], [r[observed] for r in rel], marker="o", label="model")
        if tables.get("reliability_calibrated"):
            cal = tables["reliability_calibrated"]
            ax2.plot([r["confidence"] for r in cal], [r[observed] for r in cal], marker="s",
                     label="temperature-scaled (shipped)")
        ax2.set(xlabel="confidence" if observed == "accuracy" else "predicted probability of a tag",
                ylabel=observed if observed == "accuracy" else "observed frequency", xlim=(0, 1), ylim=(0, 1),
                title="Reliability diagram")
        ax2.legend(loc="upper left")
        figures["reliability"] = fig2
    if "truth" in tables:
        fig5, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
        truth, predicted = np.asarray(tables["truth"]), np.asarray(tables["predicted"])
        low, high = float(min(truth.min(), predicted.min())), float(max(truth.max(), predicted.max()))
        left.scatter(truth, predicted, s=6, alpha=0.5)
        left.plot([low, high], [low, high], ls="--", color="grey")
        left.set(xlabel="true value", ylabel="predicted value", title="Predicted vs true (test)")
        right.scatter(predicted, predicted - truth, s=6, alpha=0.5)
        right.axhline(0, ls="--", color="grey")
        right.set(xlabel="predicted value", ylabel="residual (predicted - true)", title="Residuals (test)")
        figures["predictions"] = fig5
    return figures


def _figures(tables: dict, folder: Path) -> dict[str, str]:
    drawn = _target_figures(tables)
    metric = HEADLINE_NAMES.get(tables["headline"], tables["headline"])
    span = (0, 1) if tables["headline"] != "r2" else None  # R² has no lower bound

    robustness = tables["robustness"]
    fig3, axes = plt.subplots(1, len(robustness), figsize=(4.2 * len(robustness), 3.8), squeeze=False)
    for ax3, (modality, rows) in zip(axes[0], robustness.items()):
        levels = [r["level"] for r in rows]
        for key in rows[0]:
            if key != "level":
                model, corruption = key.split("_", 1)
                ax3.plot(levels, [r[key] for r in rows], marker=".", ls="-" if model == "fused" else "--",
                         label=f"{model}: {corruption.replace('_', ' ')}")
        ax3.set(title=f"{modality} corrupted", xlabel="noise level", ylabel=f"test {metric}", ylim=span)
        ax3.legend(fontsize=7)
    drawn["robustness"] = fig3

    fig4, ax4 = plt.subplots(figsize=(5.5, 3.2))
    missing = tables["missing"]
    ax4.barh([r["modalities"] for r in missing], [r["score"] for r in missing])
    ax4.set(xlim=span, xlabel=f"test {metric}", title="Fused model with only these modalities")
    ax4.invert_yaxis()
    drawn["missing"] = fig4

    if tables.get("coverage"):
        fig6, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        rows = tables["coverage"]
        y = np.arange(len(rows))
        left.barh(y - 0.2, [r["coverage"] for r in rows], height=0.4, label="one threshold per pattern (shipped)")
        left.barh(y + 0.2, [r["coverage_single_threshold"] for r in rows], height=0.4, label="one threshold for all",
                  color="lightgrey")
        left.axvline(rows[0]["target"], ls="--", color="black", label=f"promised: {rows[0]['target']:.0%}")
        left.set(yticks=y, yticklabels=[r["pattern"] for r in rows], xlim=(0, 1), xlabel="test coverage",
                 title="Conformal coverage by availability pattern")
        left.invert_yaxis()
        left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.45, -0.22), ncol=3)
        shapley = tables["attribution"]
        right.barh([r["modality"] for r in shapley], [r["shapley"] for r in shapley])
        right.set(xlabel=f"Shapley value (test {metric})", title="What each modality contributes")
        right.invert_yaxis()
        drawn["trust"] = fig6

    figures = {}
    for name, f in drawn.items():
        figures[name] = f"{name}.png"
        f.tight_layout()
        f.savefig(folder / figures[name], dpi=110)
        plt.close(f)
    return figures


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _headline_rows(metrics: dict) -> list[str]:
    """The headline table of the target type."""
    t, about = metrics["test"], metrics.get("target", {"type": "category"})
    if about["type"] == "number":
        transform = about.get("transform", "none")
        return [f"| R² (1 = perfect, 0 = always the mean) | {t['r2']:.4f} |",
                f"| mean absolute error | {_num(t['mae'])} |",
                f"| root mean squared error | {_num(t['rmse'])} |",
                f"| median absolute percentage error | {_pct(t['median_ape'])} |",
                f"| target transform while training | {transform} |"]
    if about["type"] == "set":
        return [f"| micro F1 (every tag decision counts the same) | {_pct(t['f1_micro'])} |",
                f"| macro F1 (each tag counts the same) | {_pct(t['f1_macro'])} |",
                f"| mean average precision (threshold-free) | {_num(t['map'])} |",
                f"| subset accuracy (the whole set right) | {_pct(t['subset_accuracy'])} |",
                f"| micro precision / recall | {_pct(t['precision_micro'])} / {_pct(t['recall_micro'])} |",
                f"| expected calibration error of the tag probabilities | {t['ece']:.4f} |"]
    return [f"| accuracy | {_pct(t['accuracy'])} |",
            f"| macro F1 (each class counts the same) | {_pct(t['f1_macro'])} |",
            f"| weighted F1 (classes weighted by support) | {_pct(t['f1_weighted'])} |",
            f"| macro precision / recall | {_pct(t['precision_macro'])} / {_pct(t['recall_macro'])} |",
            f"| expected calibration error (0 = confidence matches accuracy) | {t['ece']:.4f} |"]


def _target_sections(metrics: dict, figures: dict, rel: str) -> list[str]:
    """Per class (confusion), per tag, or the residuals; and calibration where it applies."""
    kind = metrics.get("target", {"type": "category"})["type"]
    if kind == "number":
        return ["## Predicted vs true values", "", f"![predicted vs true, residuals]({rel}/{figures['predictions']})",
                "", "Points on the diagonal are exact; residuals that fan out or curve show where the model "
                "is biased (`plots/eval/predictions.csv`).", ""]
    lines = []
    if kind == "set":
        lines += ["## Per tag", "", "Thresholds tuned on the validation split (per tag, best F1 there).", "",
                  "| tag | precision | recall | F1 | support | threshold | ECE |", "|---|---|---|---|---|---|---|",
                  *[f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} | "
                    f"{c['threshold']:.2f} | {c['ece']:.3f} |" for name, c in metrics["per_tag"].items()], ""]
    else:
        lines += ["## Per class", "", f"![confusion matrix]({rel}/{figures['confusion']})", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
                  *[f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                    for name, c in metrics["per_class"].items()], ""]
    lines += ["## Calibration", "", f"![reliability diagram]({rel}/{figures['reliability']})", "",
              "Points on the diagonal: when the model says 90 %, it is right 90 % of the time." if kind == "category"
              else "Points on the diagonal: tags given a probability of 90 % are there 90 % of the time.", ""]
    return lines


def trust_section(metrics: dict, figures: dict, rel: str, show, name: str) -> list[str]:
    """"How far to trust it": calibrated confidence, the conformal sets per availability pattern, the modalities'
    Shapley attribution."""
    conformal, fitted = metrics.get("conformal"), metrics.get("calibration")
    if not conformal:
        return []
    kind = metrics.get("target", {"type": "category"})["type"]
    alpha, marginal = conformal["alpha"], conformal["marginal"]
    what = {"category": "a set of classes that holds the true class", "number": "an interval that holds the true value",
            "set": "a set of tags that holds every true tag"}[kind]
    size = {"category": "mean set size (classes)", "number": "mean interval width", "set": "mean set size (tags)"}[kind]
    lines = ["## How far to trust it", "",
             f"Fitted on the validation split, checked here on test. Beside its answer the bundle's predictor gives "
             f"{what} in **{1 - alpha:.0%}** of cases (split conformal, alpha {alpha:g}), with one threshold per "
             "availability pattern: a sample that arrives without a modality gets the wider set it needs, not the "
             "complete samples' confidence."]
    temperature = fitted.get("temperature")
    if temperature and "ece_calibrated" in marginal:
        lines += ["", f"Confidence is temperature-scaled ({temperature['mode']}: global T = "
                  f"{temperature['global']:.3f}): expected calibration error {marginal['ece']:.4f} → "
                  f"**{marginal['ece_calibrated']:.4f}**; the answers themselves do not change."]
    lines += ["", f"![coverage and attribution]({rel}/{figures['trust']})", "",
              f"| modalities available | test rows | coverage | {size} | one threshold for all: coverage"
              + (" | ECE before → after |" if "ece" in marginal else " |"),
              "|---|---|---|---|---|" + ("---|" if "ece" in marginal else "")]
    for label, row in [("as they come (marginal)", marginal), *conformal["patterns"].items()]:
        cells = [label + (" (few rows)" if row.get("small") else ""), f"{row['rows']:,}", f"{row['coverage']:.3f}",
                 "unbounded" if row["mean_size"] is None else f"{row['mean_size']:.3g}",
                 f"{row['coverage_single_threshold']:.3f}"]
        if "ece" in row:
            cells.append(f"{row['ece']:.3f} → {row['ece_calibrated']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    shapley = metrics["attribution"][metrics.get("target", {}).get("headline", "accuracy")]
    shares = shapley["share"]
    lines += ["", f"**What each modality contributes** (exact Shapley values of test {name}: the fused model with every "
              f"subset of modalities, from {show(shapley['none'])} with none to {show(shapley['all'])} with all):", "",
              "| modality | Shapley value | share |", "|---|---|---|",
              *[f"| {m} | {v:+.4f} | {'–' if not shares else format(shares[m], '.0%')} |"
                for m, v in shapley["shapley"].items()],
              "", "Pairwise interaction (< 0: the pair carries overlapping information; > 0: it does more together): "
              + ", ".join(f"{pair} {v:+.3f}" for pair, v in shapley["interaction"].items()) + ".", ""]
    return lines


def retrieval_section(retrieval: dict | None) -> list[str]:
    """Cross-modal retrieval from the pretrain stage's aligned embeddings (nothing when it did not run)."""
    if not retrieval or not retrieval.get("enabled"):
        return []
    lines = ["## Cross-modal retrieval", "",
             f"From the embeddings the pretrain stage aligned ({retrieval['loss']}, no labels): each row's modality "
             f"*a* as the query, the same split's rows' modality *b* as the gallery (rows that have both); the true "
             f"match is the same row's *b*. Chance: k / rows.", "",
             "| query -> gallery | rows | recall@1 | recall@5 | recall@10 | median rank | chance@5 |",
             "|---|---|---|---|---|---|---|"]
    for pair, r in retrieval["pairs"].items():
        lines.append(f"| {pair.replace('->', ' -> ')} | {r['rows']:,} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | "
                     f"{r['recall@10']:.3f} | {r['median_rank']:g} | {r['chance@5']:.3f} |")
    return lines + [""]


def report_markdown(metrics: dict, tables: dict, gates_failed: list[str], figures_dir: Path, link_prefix: str) -> str:
    """The markdown report; its figures are drawn into ``figures_dir`` and linked as ``link_prefix/<name>.png``."""
    figures = _figures(tables, figures_dir)
    rel = link_prefix
    t, eff = metrics["test"], metrics["efficiency"]
    about = metrics.get("target", {"type": "category", "headline": "accuracy", "column": "label"})
    h = about["headline"]
    name = HEADLINE_NAMES.get(h, h)
    show = _num if h == "r2" else _pct
    gain = (f"**{metrics['fusion_gain']:+.4f}**" if h == "r2" else f"**{100 * metrics['fusion_gain']:+.2f} points**"
            ) if metrics["fusion_gain"] is not None else None
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
        f"Target: `{about['column']}`, a {about['type']}"
        + {"category": " (one class per sample)", "number": " (regression)", "set": " of tags (multi-label)"}.get(
            about["type"], "") + f"; headline metric: **{name}** (every gate, curve and gain below is in it"
        + (f"; the best constant answer scores {show(about['chance'])})." if "chance" in about else ")."),
        "",
        "| metric | value |",
        "|---|---|",
        *_headline_rows(metrics),
        "",
        "## Does fusion help?",
        "",
        f"{name[0].upper() + name[1:]} of models that see a single modality, trained by the same trainer:",
        "",
        f"| model | {name} |",
        "|---|---|",
        f"| **fused** | **{show(t[h])}** |",
        *[f"| {m} only | {show(b[h])} |" for m, b in metrics["baselines"].items()],
        "",
        (f"Fusion gain over the best single modality ({metrics['best_baseline']}): {gain}." if gain is not None
         else "No baselines were trained (`train.baselines: false`), so there is no fusion gain to report."),
        "",
        "## When modalities are missing",
        "",
        "The fused model with only these modalities given (the others masked as missing):",
        "",
        f"![missing modalities]({rel}/{figures['missing']})",
        "",
        f"| modalities available | {name} |",
        "|---|---|",
        *[f"| {subset} | {show(v[h])} |" for subset, v in metrics["missing"].items()],
        "",
        "## Robustness to noise",
        "",
        "One modality corrupted at a time, at noise levels from 0 (clean) to 1 (image: Gaussian noise "
        "of standard deviation = level x full range, and a black square covering that share of the "
        "image; audio: white noise from 30 dB SNR down to -10 dB; text: each character replaced, "
        f"deleted or doubled with that probability). *Relative robustness* is the area under the "
        f"{name}-vs-level curve (1.0 = unaffected and perfect). The baseline of a modality sees only "
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
    lines += ["", *_target_sections(metrics, figures, rel)]
    lines += trust_section(metrics, figures, rel, show, name)
    lines += retrieval_section(metrics.get("retrieval"))
    lines += [
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
