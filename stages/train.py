"""train: the fusion model on data/features (+ one single-modality baseline per modality).

Writes models/fusion/ and models/baseline_<modality>/ (model.safetensors + config.json),
metrics/train.json and per-epoch curves in dvclive/train/ (written live, after every epoch: `dvc exp show`
and `dvc plots show` follow the run; the same values are the MLflow run's step metrics). Killed mid-way, it resumes exactly
from the last epoch checkpoint in .checkpoints/ (outside DVC's outputs), and models it had finished
are taken from there, not trained again.

Data-parallel on several GPUs (or CPU processes): torchrun --standalone --nproc_per_node=N -m stages.train
"""

from mmpipe import layout, params, tracking
from mmpipe.tracking import lineage
from mmpipe.device import resolve_device
from mmpipe.io import atomic_dir, write_json_atomic
from mmpipe.layout import CHECKPOINTS, FEATURES, MODELS, PRETRAINED
from mmpipe.pretrain.align import encoders_to_start_from
from mmpipe.features.loader import feature_modalities
from mmpipe.training.distributed import process_group
from mmpipe.training.train import clear_checkpoints, train
from mmpipe.stage import run_stage

METRICS, LIVE = layout.METRICS["train"], layout.TRAIN_LIVE


def main() -> None:
    cfg, model_cfg = params.load("train"), params.load("model")
    present = list(feature_modalities(FEATURES))  # the registered modalities the data has
    aligned = encoders_to_start_from(model_cfg.init, PRETRAINED)  # model.init: the pretrain stage's encoders or none
    runs = {"fusion": present} | ({f"baseline_{m}": [m] for m in present} if cfg.baselines else {})
    with process_group(resolve_device(cfg.device, "train.device")) as world:
        if world.is_main:
            train_and_write(cfg, model_cfg, runs, aligned)
        else:  # the other ranks train alongside rank 0, which alone writes outputs and logs
            for modalities in runs.values():
                train(cfg, model_cfg, FEATURES, modalities, None, CHECKPOINTS, aligned=aligned)


def train_and_write(cfg, model_cfg, runs: dict[str, list[str]], aligned) -> None:
    results, finished = {}, []
    with tracking.stage_run("train", {"train": cfg.model_dump(), "model": model_cfg.model_dump()}) as run, \
            tracking.curves(run, LIVE) as curves:
        lineage.log_splits(run.run_id, ["train", "val"])
        with atomic_dir(MODELS) as models:
            for name, modalities in runs.items():
                def log_epoch(epoch: int, row: dict, name=name) -> None:
                    curves.log(name, epoch, row)

                def replay(rows: list[dict], name=name) -> None:  # resumed: the killed run's epochs first
                    for row in rows:
                        curves.log(name, row["epoch"], row)

                result = train(cfg, model_cfg, FEATURES, modalities, models / name, CHECKPOINTS, log_epoch,
                               on_resume=replay, aligned=aligned)
                results[name] = result["metrics"]
                finished.append(result["checkpoint"])
                m = result["metrics"]
                headline = m.get("headline", "accuracy")
                print(f"train[{name}]: val {headline} {m[f'val_{headline}']:.4f} at epoch {m['best_epoch']} "
                      f"({m['epochs_run']} epochs, {m['parameters']:,} parameters, {m['samples_per_s']:.0f} samples/s "
                      f"on {m['device']}, {m['seconds']:.0f}s)")
        write_json_atomic(METRICS, results)
        clear_checkpoints(finished)  # every model is written: a re-run trains afresh
        run.log_metrics_file(METRICS)


if __name__ == "__main__":
    run_stage(main)
