"""collect: read data.source (built-in corpus, manifest or folder) into data/raw/*.parquet."""


from mmpipe import layout, params, tracking
from mmpipe.layout import RAW
from mmpipe.data.collect import collect
from mmpipe.io import atomic_dir
from mmpipe.stage import run_stage

METRICS = layout.METRICS["collect"]


def main() -> None:
    data = params.load("data")
    with tracking.stage_run("collect", data) as run:
        with atomic_dir(RAW) as tmp:
            metrics = collect(data, tmp)
        run.write_metrics(METRICS, metrics)
    present = ", ".join(f"{m} {n}" for m, n in metrics["present"].items())
    errors = sum(metrics["fetch_errors"].values())
    print(f"collect: {metrics['samples']} samples from {metrics['source']} into {metrics['files']} file(s) "
          f"[present: {present}; fetch errors: {errors}] in {metrics['seconds']:.1f}s")


if __name__ == "__main__":
    run_stage(main)
