"""compress: models/fusion -> artifacts/compressed/ (fp32, pruned, int8 ONNX, with compress.distill the student
and student_int8, + the chosen model.onnx) and metrics/compress.json (the target's headline metric, size, MACs,
sparsity, latency of each variant; the student's retention per modality subset and robustness; the choice)."""


from mmpipe import layout, params, tracking
from mmpipe.layout import CLEAN, COMPRESSED, FEATURES, FUSION
from mmpipe.compress.compress import compress
from mmpipe.io import atomic_dir, scratch
from mmpipe.stage import run_stage

METRICS = layout.METRICS["compress"]
CHAIN = ["fp32", "pruned", "int8", "int8_dynamic", "student", "student_int8"]  # the variants in the order they are made
VARIANT_CURVES = ["file_bytes", "macs_per_sample", "sparsity", "latency_ms"]  # after val_/test_<headline>


def main() -> None:
    cfg = params.load("compress")
    with tracking.stage_run("compress", cfg) as run, tracking.curves(run, layout.COMPRESS_LIVE) as curves:
        steps = {}

        def log(name: str, row: dict) -> None:  # fine-tuning and distillation epochs, int8 trials: MLflow + DVCLive
            steps[name] = steps.get(name, -1) + 1
            curves.log(name, steps[name], row)

        with atomic_dir(COMPRESSED) as out, scratch(COMPRESSED):  # ONNX Runtime's temporary files beside the output
            metrics = compress(cfg, FEATURES, FUSION, out, log, clean_dir=CLEAN)
        chain = sorted(metrics["variants"], key=lambda v: CHAIN.index(v) if v in CHAIN else len(CHAIN))
        h = metrics["headline"]
        for step, name in enumerate(chain):  # always one step at least (fp32): dvc.yaml declares the files
            curves.log("variants", step, {k: metrics["variants"][name].get(k)
                                          for k in (f"val_{h}", f"test_{h}", *VARIANT_CURVES)})
        run.write_metrics(METRICS, metrics)
    shipped, fp32, key = metrics["shipped"], metrics["variants"]["fp32"], f"val_{metrics['headline']}"
    print(f"compress: chose {shipped['variant']} — val {metrics['headline']} {shipped[key]:.4f} (fp32 {fp32[key]:.4f}), "
          f"{shipped['smaller_than_fp32_onnx']:.1f}x smaller, batch-32 {shipped['faster_than_fp32_onnx_batch_32']:.2f}x "
          f"faster than fp32 ONNX")


if __name__ == "__main__":
    run_stage(main)
