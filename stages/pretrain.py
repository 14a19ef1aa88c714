"""pretrain: align the modalities' encoders on every train row, labelled or not -> artifacts/pretrain/
(aligned.safetensors + config.json), metrics/pretrain.json (validation retrieval per modality pair) and
per-epoch curves in dvclive/pretrain/. With pretrain.enabled false (the default) it writes only a
config.json saying so: a no-op that leaves train's inputs unchanged.
"""

import shutil

from mmpipe import layout, params, tracking
from mmpipe.io import atomic_dir, write_bytes_atomic, write_json_atomic
from mmpipe.layout import FEATURES, PRETRAINED
from mmpipe.pretrain.align import pretrain, write_disabled
from mmpipe.stage import run_stage

METRICS, LIVE = layout.METRICS["pretrain"], layout.PRETRAIN_LIVE


def main() -> None:
    cfg, model_cfg = params.load("pretrain"), params.load("model")
    if not cfg.enabled:
        with atomic_dir(PRETRAINED) as out:
            write_disabled(out)
        # the curve files dvc.yaml declares, with no steps (a header only); an earlier run's curves go
        shutil.rmtree(LIVE, ignore_errors=True)
        write_bytes_atomic(LIVE / "metrics.json", b"{}\n")
        write_bytes_atomic(LIVE / "plots" / "metrics" / "align" / "train_loss.tsv", b"step\ttrain_loss\n")
        write_json_atomic(METRICS, {"enabled": False})
        print("pretrain: off (pretrain.enabled: false): train starts from scratch")
        return
    with tracking.stage_run("pretrain", {"pretrain": cfg.model_dump(), "model": model_cfg.model_dump()}) as run, \
            tracking.curves(run, LIVE) as curves, atomic_dir(PRETRAINED) as out:
        result = pretrain(cfg, model_cfg, FEATURES, out, lambda epoch, row: curves.log("align", epoch, row))
        run.write_metrics(METRICS, result["metrics"])
    m = result["metrics"]
    print(f"pretrain: {m['loss']} on {m['rows']['train']} train rows ({m['rows']['train_unlabelled']} unlabelled), "
          f"val mean recall@1 {m['val_mean_recall@1']:.3f} / @5 {m['val_mean_recall@5']:.3f} over "
          f"{len(m['val'])} modality pairs at epoch {m['best_epoch']} ({m['epochs_run']} epochs, {m['seconds']:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
