"""Where the stages read and write, relative to the repository root: the one list of the paths
``dvc.yaml`` declares (``tests/test_docs.py`` checks every stage's outputs there are these).

The library takes paths as arguments and knows none of these; the stage scripts and ``summary``
(the MLflow row, read from the metrics files) import them from here.
"""

from __future__ import annotations

from pathlib import Path

SOURCE = Path("data/source.json")  # the source stage's fingerprint of data.source
RAW = Path("data/raw")
CLEAN = Path("data/clean")
FEATURES = Path("data/features")  # one folder per modality
PARTITIONS = Path("data/partitions")  # preprocess.partitions: data/partitions/<modality>/<k>/
MODELS = Path("models")  # fusion/ and baseline_<modality>/
FUSION = MODELS / "fusion"
WEIGHTS = Path("weights")  # local pretrained weight files (a dependency of train)
PRETRAINED = Path("artifacts/pretrain")  # the pretrain stage's aligned encoders (config.json only when it is off)
CHECKPOINTS = Path(".checkpoints/train")  # resumable training state (not a DVC output)
# DVCLive folders (per-step curves, written live while the stage runs): metrics.json + plots/metrics/
PRETRAIN_LIVE = Path("dvclive/pretrain")
TRAIN_LIVE = Path("dvclive/train")
COMPRESS_LIVE = Path("dvclive/compress")
EVAL_PLOTS = Path("plots/eval")
EVAL_REPORT = Path("reports/eval.md")
EVAL_FIGURES = Path("reports/eval")
TUNE_REPORTS = Path("reports/tune")  # python -m stages.tune (not a DVC stage): one folder per study
COMPRESSED = Path("artifacts/compressed")
DEPLOY = Path("artifacts/deploy")

METRICS = {stage: Path(f"metrics/{name}.json") for stage, name in (
    ("collect", "collect"), ("clean", "clean"), ("pretrain", "pretrain"), ("train", "train"), ("evaluate", "eval"), ("compress", "compress"),
    ("export", "export"))}


def features(modality: str) -> Path:
    return FEATURES / modality


def partitions(modality: str) -> Path:
    """The partitions' folders of a modality (preprocess.partitions): <k>/ each; the folder itself is in git."""
    return PARTITIONS / modality


def partition(modality: str, part: int | str) -> Path:
    return partitions(modality) / str(part)


def preprocess_metrics(modality: str) -> Path:
    return Path(f"metrics/preprocess_{modality}.json")


def live_files(folder: Path) -> set[str]:
    """What dvc.yaml declares of a DVCLive folder: its latest values (metrics) and its curves (plots)."""
    return {str(folder / "metrics.json"), str(folder / "plots" / "metrics")}


def stage_outputs(modality: str = "${item.modality}") -> dict[str, set[str]]:
    """Stage -> the paths it writes (outs, metrics, plots), as dvc.yaml spells them."""
    return {
        "source": {str(SOURCE)},
        "collect": {str(RAW), str(METRICS["collect"])},
        "clean": {str(CLEAN), str(METRICS["clean"])},
        "preprocess-part": {str(partition(modality, "${item.part}"))},
        "preprocess": {str(features(modality)), str(preprocess_metrics(modality))},
        "pretrain": {str(PRETRAINED), str(METRICS["pretrain"]), *live_files(PRETRAIN_LIVE)},
        "train": {str(MODELS), str(METRICS["train"]), *live_files(TRAIN_LIVE)},
        "evaluate": {str(EVAL_PLOTS), str(EVAL_REPORT), str(EVAL_FIGURES), str(METRICS["evaluate"])},
        "compress": {str(COMPRESSED), str(METRICS["compress"]), *live_files(COMPRESS_LIVE)},
        "export": {str(DEPLOY), str(METRICS["export"])},
        "summary": set(),
    }
