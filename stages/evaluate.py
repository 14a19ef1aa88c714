"""evaluate: the trained models on the test split -> metrics/eval.json, plots/eval/, reports/eval.md.

Quality gates (evaluate.gates) are checked last: a failed gate ends the stage with one line per
gate and a non-zero exit, after the metrics and the report are written, so that the user sees why
and dvc repro goes no further (compress and export depend on this stage).
"""

from mmpipe import layout, params, tracking
from mmpipe.tracking import lineage
from mmpipe.errors import PipelineError
from mmpipe.evaluate.evaluate import evaluate, failed_gates
from mmpipe.evaluate.report import report_markdown, write_plot_data
from mmpipe.io import atomic_dir, write_bytes_atomic
from mmpipe.layout import CLEAN, FEATURES, MODELS, PRETRAINED
from mmpipe.stage import run_stage

METRICS = layout.METRICS["evaluate"]
PLOTS, REPORT, FIGURES = layout.EVAL_PLOTS, layout.EVAL_REPORT, layout.EVAL_FIGURES


def main() -> None:
    cfg = params.load("evaluate")
    with tracking.stage_run("evaluate", cfg) as run:
        lineage.log_splits(run.run_id, ["test"])
        result = evaluate(cfg, FEATURES, CLEAN, MODELS, aligned_dir=PRETRAINED)
        metrics = result["metrics"]
        failed, skipped = failed_gates(metrics, cfg.gates)
        for line in skipped.values():
            print(f"evaluate: note: {line}: not checked")
        checked = {k: v for k, v in cfg.gates.model_dump().items()  # export's alias policy reads it
                   if v not in (None, {}) and k not in skipped}
        metrics["gates"] = {"checked": checked, "passed": not failed, "failed": failed}
        if skipped:
            metrics["gates"]["not_applicable"] = list(skipped.values())
        with atomic_dir(PLOTS) as plots:
            write_plot_data(result["tables"], plots)
        with atomic_dir(FIGURES) as figures:  # the report's PNGs, linked from reports/eval.md as eval/<name>.png
            report = report_markdown(metrics, result["tables"], failed, figures, FIGURES.name)
        write_bytes_atomic(REPORT, report.encode())
        run.write_metrics(METRICS, metrics)
        for path in (PLOTS, FIGURES, REPORT):
            run.log_artifact(path)
        if failed:
            raise PipelineError("\n".join(failed))
    print(f"evaluate: wrote {METRICS}, {PLOTS}/, {REPORT} (all quality gates pass)")


if __name__ == "__main__":
    run_stage(main)
