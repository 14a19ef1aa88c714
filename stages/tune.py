"""tune: hyperparameter search (Optuna) over ``tune.space`` on the current data/features.

Not a DVC stage (a search is not a pure function of its inputs): ``make tune`` first brings the
feature sets up to date (``dvc repro preprocess``), then runs this. The study is kept in tune.db
beside mlflow.db and resumes; its trials are MLflow child runs of one "tune" row; its plots and
trials table go to reports/tune/<study>/. With ``tune.run_best`` the best values then run through
the whole pipeline as a DVC experiment (``dvc exp run -n tuned-<study>-t<N> -S ...``).
"""

import json
import subprocess
import sys

from mmpipe import params, tracking, tune
from mmpipe.tracking import lineage
from mmpipe.errors import PipelineError
from mmpipe.features.loader import FeatureSet, feature_modalities
from mmpipe.io import atomic_dir, write_json_atomic
from mmpipe.layout import FEATURES, TUNE_REPORTS
from mmpipe.training.train import train
from mmpipe.stage import run_stage


def main() -> None:
    cfg = params.load("tune")
    sections = {"train": params.load("train"), "model": params.load("model")}
    tune.check(cfg, sections)
    modalities = list(feature_modalities(FEATURES)) if FEATURES.is_dir() else []
    if not modalities:
        raise PipelineError(f"{FEATURES}: no feature sets; run `dvc repro preprocess` first (make tune does)")
    cfg = tune.resolve_metric(cfg, FeatureSet(FEATURES, split="val").target.HEADLINE)  # headline -> val_r2, ...
    name = tune.study_name(cfg, sections, lineage.data_identity()["digest"])
    study = tune.open_study(cfg, name, tracking.project_root() / tune.STUDY_FILE, sections["train"].epochs)
    remaining = cfg.trials - len(tune.counted(study))
    print(f"tune: study {name} ({tune.STUDY_FILE}): {len(tune.counted(study))} trials done, {max(remaining, 0)} to run; "
          f"{cfg.metric} on the validation split, {cfg.pruner.kind} pruning")

    def train_once(train_cfg, model_cfg, on_epoch):  # the fusion model only: baselines do not change the choice
        return train(train_cfg, model_cfg, FEATURES, modalities, None, None, on_epoch)

    with tracking.tune_run(name, cfg) as run:
        if remaining > 0:
            study.optimize(tune.objective(cfg, sections, train_once, name), n_trials=remaining, timeout=cfg.timeout_s,
                           catch=(Exception,))  # one trial's error fails that trial (objective), not the study
        result = tune.summary(study)
        folder = TUNE_REPORTS / name
        with atomic_dir(folder) as tmp:  # the study's report lands whole or not at all
            tune.write_plots(study, tmp)
            write_json_atomic(tmp / "summary.json", result)
        for path in sorted(folder.iterdir()):
            run.log_artifact(path)
        run.log_metrics({k: result[k] for k in ("trials", "complete", "pruned", "fail")}
                        | {f"best_{cfg.metric}": result.get("best", {}).get("value"),
                           **{f"importance.{k}": v for k, v in result.get("importance", {}).items()}})
    if "best" not in result:
        raise PipelineError(f"tune: study {name} has no completed trial ({result['pruned']} pruned, {result['fail']} "
                            "failed): nothing to run")
    best = result["best"]
    exp = tune.experiment_name(name, best["trial"])
    command = tune.dvc_exp_command(exp, best["params"])
    print(f"tune: best trial {best['trial']}: {cfg.metric} {best['value']:.4f} with {json.dumps(best['params'])}")
    if not cfg.run_best:
        print("tune: tune.run_best is false; to run it through the pipeline: dvc " + " ".join(command))
        return
    existing = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--all-commits", "--name-only"],
                              capture_output=True, text=True).stdout.split()
    if exp in existing:
        print(f"tune: experiment {exp} already exists (dvc exp show); nothing to run")
        return
    print("tune: dvc " + " ".join(command))
    ran = subprocess.run([sys.executable, "-m", "dvc", *command])
    if ran.returncode != 0:
        raise PipelineError(f"tune: `dvc {' '.join(command)}` failed (exit {ran.returncode}); see its output above")
    run.set_tags({"tune.best_experiment": exp})
    print(f"tune: experiment {exp} done: `dvc exp show`, its MLflow pipeline row and registered model version")


if __name__ == "__main__":
    run_stage(main)
