"""The headline figures of a pipeline execution, read from the stages' metrics files.

One MLflow row per pipeline execution (the parent run, mmpipe.tracking) carries these, so the
MLflow UI compares executions on a handful of columns instead of hundreds. They are read from the
metrics files, not from memory, so a stage that DVC restored from its cache still contributes.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from mmpipe.io import flatten
from mmpipe.layout import EVAL_FIGURES, EVAL_PLOTS, EVAL_REPORT, METRICS
from mmpipe.tracking.curves import metric_name

# Stages in DAG order (preprocess@<modality> counts as "preprocess"): a stage that just finished
# may read its own file and those of the stages before it, which are current; later stages'
# files may still be from an earlier execution.
ORDER = ["collect", "clean", "preprocess", "pretrain", "train", "evaluate", "compress", "export"]

# stage -> key patterns in its flattened metrics file (layout.METRICS); with each stage's own wall time
# and peak memory (``process``, mmpipe.resources)
PROCESS = ["process.wall_s", "process.peak_rss_mb"]
HEADLINE: dict[str, list[str]] = {
    "collect": ["samples", *PROCESS],
    "clean": ["kept", "rejected_samples", *PROCESS],
    "pretrain": ["val_mean_recall@1", "val_mean_recall@5", "seconds", *PROCESS],
    # (each target's headline and companions: category accuracy/F1/ECE, number R²/RMSE/MAE, set micro-F1/mAP)
    "train": ["fusion.val_accuracy", "fusion.val_r2", "fusion.val_f1_micro", "fusion.seconds", *PROCESS],
    "evaluate": ["test.accuracy", "test.f1_macro", "test.ece", "test.r2", "test.rmse", "test.mae", "test.f1_micro",
                 "test.map", "fusion_gain", "robustness.*.relative", "retrieval.mean_recall@1",
                 "retrieval.mean_recall@5", *PROCESS],
    "compress": ["shipped.*", *PROCESS],
    "export": ["predictor_raw_test_accuracy", "predictor_raw_test_r2", "predictor_raw_test_f1_micro",
               "int8_vs_its_fp32_top1_agreement", "fp32_onnx_vs_pytorch_max_abs_logit_diff", "bundle_bytes", *PROCESS],
}


METRICS_FILES = [str(METRICS[stage]) for stage in ORDER if stage in HEADLINE]  # what the figures are read from

# Outputs whose copy the pipeline run keeps as artifacts (local path -> artifact folder), so that
# an execution's curves and report stay with its row even when DVC restored evaluate from its cache.
# The report links its figures as eval/<name>.png: they go next to it.
ARTIFACTS = {str(EVAL_PLOTS): "eval", str(EVAL_REPORT): "report", str(EVAL_FIGURES): "report/eval"}


def stage_family(stage: str) -> str:
    return stage.split("@", 1)[0]


def stage_figures(root: Path, upto: str | None = None) -> dict[str, float]:
    """``{"<stage>.<key>": value}`` from the metrics files of ``upto`` and the stages before it
    (all stages when None); missing files and non-numeric values are skipped."""
    last = ORDER.index(stage_family(upto)) if upto and stage_family(upto) in ORDER else len(ORDER) - 1
    out: dict[str, float] = {}
    for stage in ORDER[:last + 1]:
        if stage not in HEADLINE:
            continue
        patterns = HEADLINE[stage]
        try:
            flat = flatten(json.loads((root / METRICS[stage]).read_text()))
        except (OSError, ValueError):
            continue
        for key, value in flat.items():
            if any(fnmatch.fnmatchcase(key, p) for p in patterns) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                out[metric_name(f"{stage}.{key}")] = float(value)
    return out
