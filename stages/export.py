"""export: artifacts/compressed + fitted preprocessing state -> artifacts/deploy/ (the self-contained
bundle) and metrics/export.json (parity of ONNX vs PyTorch, int8 vs fp32 agreement, the standalone
predictor's accuracy on the raw test files). A failed check ends the stage non-zero, after writing.
Then, the bundle in place, it is registered in MLflow and the alias moved under the promotion policy
(docs/deployment.md)."""

import functools
import json

from mmpipe import layout, params, tracking
from mmpipe.tracking import lineage
from mmpipe.deploy.export import export, model_metrics
from mmpipe.deploy.verify import bundle_accuracy, failed_checks
from mmpipe.deploy.registry import publish
from mmpipe.errors import PipelineError, redact
from mmpipe.io import atomic_dir, scratch, write_json_atomic
from mmpipe.stage import run_stage

OUT, METRICS = layout.DEPLOY, layout.METRICS["export"]


def main() -> None:
    cfg = params.load("export")
    with tracking.stage_run("export", cfg) as run, scratch(OUT):  # temporary files (the champion's bundle) beside the output
        with atomic_dir(OUT) as out:
            eval_metrics = json.loads(layout.METRICS["evaluate"].read_text())
            compress_metrics = json.loads(layout.METRICS["compress"].read_text())
            checks, example = export(cfg, out, layout.COMPRESSED, layout.FUSION, layout.FEATURES, layout.RAW,
                                     layout.CLEAN, eval_metrics, compress_metrics, redact(params.load("data").source),
                                     params.load("evaluate").calibration, layout.PRETRAINED)
            h = checks["headline"]  # the target's headline metric: accuracy, r2, f1_micro
            failed = failed_checks(checks, cfg)
            if failed:  # keep the metrics so the user sees why; no bundle
                write_json_atomic(METRICS, checks | {"passed": False, "failed": failed})
                raise PipelineError("\n".join(failed))
        if cfg.registered_model:  # served by `mlflow models serve -m models:/<name>@<alias>`
            data_digest = lineage.data_identity()["digest"]
            checks["mlflow"] = publish(
                OUT, cfg.registered_model, cfg.alias, cfg.move_alias, eval_metrics, checks[f"predictor_raw_test_{h}"],
                example, functools.partial(bundle_accuracy, features_root=layout.FEATURES, raw_dir=layout.RAW,
                                           clean_dir=layout.CLEAN, batch_size=cfg.predict_batch_size),
                data_digest, model_metrics(checks, eval_metrics, compress_metrics),
                tracking.execution_tags() | {"shipped_variant": checks["shipped_variant"]},
                lineage.split_datasets(["test"])[0][0])
            done = checks["mlflow"]
            print(f"export: {cfg.registered_model} version {done['version']} "
                  f"{'registered' if done['registered'] else 'already registered'}; alias '{cfg.alias}' "
                  f"{'moved to it' if done['alias_moved'] else 'not moved'}: {done['alias_decision']}")
        write_json_atomic(METRICS, checks | {"passed": True, "failed": []})
        run.log_metrics_file(METRICS)
        run.log_artifact(OUT / "MODEL_CARD.md")
        run.log_artifact(OUT / "manifest.json")
        run.log_artifact(OUT / "drift_reference.json")  # the training data's statistics, as the monitor reads them
    print(f"export: {OUT}/ ({checks['bundle_files']} files, {checks['bundle_bytes'] / 1e6:.2f} MB); ONNX vs PyTorch "
          f"{checks['fp32_onnx_vs_pytorch_max_abs_logit_diff']:.1e}; shipped {checks['shipped_variant']} vs unpruned fp32 "
          f"agreement {checks['shipped_vs_fp32_top1_agreement']:.4f}; predictor on raw test files: {h} "
          f"{checks[f'predictor_raw_test_{h}']:.4f} (evaluate {checks[f'evaluate_test_{h}']:.4f})")


if __name__ == "__main__":
    run_stage(main)
