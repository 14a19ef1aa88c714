"""summary: complete this execution's MLflow pipeline row (every parameter of params.yaml and each
stage's headline metrics, read from the metrics files) and print it.

Runs at the end of every ``dvc repro`` / ``dvc exp run`` (always_changed), so the row exists and
is complete even when DVC restored every stage from its cache; it writes nothing DVC tracks.
"""

from mmpipe import tracking
from mmpipe.stage import run_stage


def main() -> None:
    unchanged = tracking.unchanged_pipeline_row()
    if unchanged is not None:  # a no-op `dvc repro`: the row already holds all of it
        print(unchanged + " (unchanged)")
        return
    run = tracking.complete_pipeline_run()
    metrics = run.data.metrics
    shown = ", ".join(f"{key} {metrics[key]:.4g}" for key in (
        "evaluate.test.accuracy", "evaluate.test.f1_macro", "compress.shipped.file_bytes",
        "compress.shipped.batch_32_p50_ms") if key in metrics)
    line = (f"summary: MLflow run '{run.info.run_name}' ({run.info.run_id}): {len(run.data.params)} params, "
            f"{len(metrics)} headline metrics; {shown}")
    print(line)
    tracking.remember_pipeline_row(line)


if __name__ == "__main__":
    run_stage(main)
