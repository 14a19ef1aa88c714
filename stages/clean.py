"""clean: validate, normalise, deduplicate and split data/raw into data/clean (+ rejects.parquet)."""


from mmpipe import layout, params, tracking
from mmpipe.layout import CLEAN, RAW
from mmpipe.data.clean import clean
from mmpipe.names import REJECTS_FILE
from mmpipe.io import atomic_dir
from mmpipe.stage import run_stage

METRICS = layout.METRICS["clean"]


def main() -> None:
    cfg = params.load("clean")
    with tracking.stage_run("clean", cfg) as run:
        with atomic_dir(CLEAN) as tmp:
            metrics = clean(cfg, RAW, tmp)
        run.write_metrics(METRICS, metrics)
        run.log_artifact(CLEAN / REJECTS_FILE)
    codes = ", ".join(f"{code} {n}" for code, n in metrics["rejects_by_code"].items()) or "none"
    splits = ", ".join(f"{s} {n}" for s, n in metrics["split"].items())
    print(f"clean: kept {metrics['kept']} of {metrics['samples_in']} samples [{splits}]; "
          f"rejected {metrics['rejected_samples']} samples, {metrics['reject_rows']} reject rows ({codes}) "
          f"in {metrics['seconds']:.1f}s -> {CLEAN / REJECTS_FILE}")


if __name__ == "__main__":
    run_stage(main)
