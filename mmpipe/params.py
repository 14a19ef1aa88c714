"""Typed schemas for params.yaml, one per stage section.

Every stage validates its own section before doing any work: an unknown key, a wrong type or an
out-of-range value stops it with one line per problem naming the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator, model_serializer, model_validator

from mmpipe.data.builtin import BuiltinCorpus
from mmpipe.errors import PipelineError
from mmpipe.modalities import MODALITIES
from mmpipe.names import FUSIONS
from mmpipe.schema import Strict, check_weights_folder

PARAMS_FILE = "params.yaml"


class TargetParams(Strict):
    """data.target: what the model predicts (mmpipe/targets/)."""
    column: str = Field("label", min_length=1)
    type: Literal["category", "number", "set"] = "category"
    transform: Literal["none", "log"] = "none"  # number
    separator: str = Field(";", min_length=1)  # set
    min_count: int = Field(1, ge=1)  # set
    empty: Literal["no_tags", "unlabelled"] = "no_tags"  # set

    @field_validator("column")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        reserved = ("id", "split", "group", *MODALITIES, *(f"{m}_file" for m in MODALITIES))
        if value in reserved:
            raise ValueError(f"{value!r} is a column the pipeline reads for another purpose")
        return value


class DataBase(Strict):
    source: str = "builtin:digits"
    n_samples: int = Field(4000, ge=10, le=10_000_000)
    seed: int = Field(0, ge=0)
    workers: int = Field(0, ge=0, le=256)
    rows_per_file: int = Field(20000, ge=100)
    fetch_threads: int = Field(8, ge=1, le=256)
    fetch_timeout_s: float = Field(30.0, gt=0)
    max_file_mb: float = Field(64.0, gt=0)
    max_manifest_mb: float = Field(1024.0, gt=0)
    max_manifest_rows: int = Field(5_000_000, ge=1)
    max_manifest_columns: int = Field(2048, ge=1, le=1_000_000)
    allowed_protocols: list[str] = Field(default_factory=lambda: ["file", "http", "https"], min_length=1)
    confine_to_root: bool = False
    builtin: BuiltinCorpus = BuiltinCorpus()
    target: TargetParams = TargetParams()

    @model_validator(mode="after")
    def _check_protocols(self) -> "DataBase":
        bad = [p for p in self.allowed_protocols if not p or not p.replace("-", "").replace("+", "").isalnum()]
        if bad:
            raise ValueError(f"allowed_protocols must be protocol names such as file, http, https, s3 (got {bad})")
        return self


class SplitFractions(Strict):
    train: float = Field(0.7, ge=0.0, le=1.0)
    val: float = Field(0.15, ge=0.0, le=1.0)
    test: float = Field(0.15, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class CleanBase(Strict):
    seed: int = Field(0, ge=0)
    split: SplitFractions = SplitFractions()
    min_per_class: int = Field(5, ge=1)
    on_bad_modality: Literal["keep_sample", "drop_sample"] = "keep_sample"
    workers: int = Field(0, ge=0, le=256)
    batch_rows: int = Field(512, ge=1)


class PreprocessBase(Strict):
    workers: int = Field(0, ge=0, le=256)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_rows: int = Field(16384, ge=1)
    batch_rows: int = Field(512, ge=1)
    embed_batch: int = Field(64, ge=1, le=65536)  # samples per backbone forward pass of the embedding cache
    partitions: list[int] = Field(default_factory=list, max_length=1024)

    @field_validator("partitions")
    @classmethod
    def _numbered(cls, value: list[int]) -> list[int]:
        if value != list(range(len(value))):
            raise ValueError(f"must be [] or [0, 1, ..., N-1] (got {value})")
        return value


class ModelBase(Strict):
    fusion: Literal[FUSIONS] = "concat"
    dim: int = Field(128, ge=8, le=4096)
    hidden: int = Field(256, ge=8, le=16384)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    augment: bool = True  # training-time augmentation of every encoder that has one
    attention_layers: int = Field(2, ge=1, le=24)
    attention_heads: int = Field(4, ge=1, le=64)
    # the encoders' starting weights: pretrained = the pretrain stage's aligned encoders; auto = those when
    # pretrain.enabled, else scratch (random, or each encoder's own local weights file)
    init: Literal["auto", "scratch", "pretrained"] = "auto"

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "ModelBase":
        if self.dim % self.attention_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of attention_heads ({self.attention_heads})")
        return self

    @model_validator(mode="after")
    def _weights_in_their_modality_folder(self) -> "ModelBase":
        encoders = getattr(self, "encoders", None)
        for m in (type(encoders).model_fields if encoders is not None else ()):
            check_weights_folder(getattr(getattr(encoders, m), "weights", None), m, f"model.encoders.{m}.weights")
        return self


class TrainParams(Strict):
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0.0)
    patience: int = Field(6, ge=1)
    modality_dropout: float = Field(0.25, ge=0.0, lt=1.0)
    baselines: bool = True
    compile: bool = False
    cuda_graphs: Literal["auto"] | bool = "auto"
    threads: int = Field(0, ge=0, le=256)
    memory_budget_mb: int = Field(4096, ge=0)
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)  # share of the labelled train rows trained on (seeded)


class PretrainParams(Strict):
    """Contrastive alignment of the modalities on every train row, labelled or not (mmpipe/pretrain)."""
    enabled: bool = False
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: Literal["siglip", "infonce"] = "infonce"
    epochs: int = Field(40, ge=1, le=10_000)
    patience: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    grad_clip: float = Field(1.0, gt=0.0)
    proj_dim: int = Field(64, ge=2, le=4096)
    threads: int = Field(0, ge=0, le=256)


class Gates(Strict):
    """Quality bars of the evaluate stage; null = not checked. A failed gate stops the pipeline."""
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    min_f1_macro: float | None = Field(None, ge=0.0, le=1.0)
    min_fusion_gain: float | None = Field(None, ge=-1.0, le=1.0)
    # any test metric of the target by name (metrics/eval.json: test), e.g. min: {r2: 0.6}, max: {rmse: 40}
    min: dict[str, float] = Field(default_factory=dict)
    max: dict[str, float] = Field(default_factory=dict)
    # test coverage of the conformal sets (at calibration.alpha), marginal and per availability pattern with at
    # least calibration.min_pattern_rows test rows
    min_coverage: float | None = Field(None, ge=0.0, le=1.0)
    # no modality may carry more than this share of the positive Shapley values (headline): modality collapse
    max_modality_share: float | None = Field(None, gt=0.0, le=1.0)


class Calibration(Strict):
    """Temperature scaling and conformal prediction sets, fitted on the validation split (mmpipe/trust)."""
    temperature: Literal["pattern", "global", "none"] = "pattern"
    alpha: float = Field(0.1, gt=0.0, lt=1.0)
    alphas: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2], min_length=1)
    min_pattern_rows: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _alpha_calibrated(self) -> "Calibration":
        if any(not 0.0 < a < 1.0 for a in self.alphas):
            raise ValueError(f"alphas must lie strictly between 0 and 1 (got {self.alphas})")
        if self.alpha not in self.alphas:
            raise ValueError(f"alpha {self.alpha} must be one of alphas {self.alphas} (the levels calibrated)")
        return self


class EvaluateParams(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, ge=0)
    noise_levels: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)], min_length=2)
    ece_bins: int = Field(15, ge=2, le=1000)
    latency_runs: int = Field(50, ge=5, le=100_000)
    calibration: Calibration = Calibration()
    gates: Gates = Gates()

    @model_validator(mode="after")
    def _check_levels(self) -> "EvaluateParams":
        levels = self.noise_levels
        if any(not 0.0 <= x <= 1.0 for x in levels) or levels != sorted(set(levels)):
            raise ValueError(f"noise_levels must be increasing, distinct, within 0..1 (got {levels})")
        bar = self.gates.min_coverage
        if bar is not None and bar > 1.0 - self.calibration.alpha + 1e-12:
            raise ValueError(f"gates.min_coverage {bar} is above 1 - calibration.alpha = {1 - self.calibration.alpha:g}: "
                             f"the sets promise only that (lower the gate or alpha)")
        return self


class Prune(Strict):
    method: Literal["none", "unstructured", "structured"] = "structured"
    amount: float = Field(0.5, ge=0.0, lt=1.0)
    finetune_epochs: int = Field(6, ge=0, le=1000)
    finetune_lr: float = Field(1e-3, gt=0.0)
    finetune_batch_size: int = Field(128, ge=1)


class Quantize(Strict):
    enabled: bool = True
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(256, ge=1)
    layers: Literal["all", "not_slower"] = "not_slower"
    dynamic: bool = False  # also the int8_dynamic variant (MatMul + Gather weights; transformers)


class Distill(Strict):
    """compress.distill: a smaller student trained on the fusion model's outputs (mmpipe.training.distill)."""
    enabled: bool = False
    init: Literal["pruned", "scratch"] = "pruned"
    width_scale: Literal["auto"] | float = "auto"
    # by modality or modality.layer (init pruned: a module path inside that encoder): overrides width_scale
    encoder_width_scale: dict[str, float] = Field(default_factory=dict)
    max_macs_share: float = Field(0.2, gt=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0)
    feature_weight: float = Field(1.0, ge=0.0)
    teacher_views: Literal["clean", "augmented"] = "augmented"
    map_weight: float = Field(2.0, ge=0.0)
    alone_weight: float = Field(1.0, ge=0.0)  # the each-modality-alone view's weight (the other two views: 1)
    # the epoch kept (and early stopping's score): the mean headline over every modality subset, or that mean
    # plus the worst subset's gap to the teacher's (mmpipe.training.distill.Teacher.selection_score)
    select_by: Literal["mean", "mean_and_worst_gap"] = "mean"
    epochs: int = Field(120, ge=1, le=10_000)
    patience: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    modality_dropout: float = Field(0.25, ge=0.0, lt=1.0)
    robustness_levels: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=2)

    @model_validator(mode="after")
    def _check(self) -> "Distill":
        if self.width_scale != "auto" and not 0.0 < self.width_scale <= 1.0:
            raise ValueError(f"width_scale must be auto or within (0, 1] (got {self.width_scale})")
        if any(not 0.0 < v <= 1.0 for v in self.encoder_width_scale.values()):
            raise ValueError(f"encoder_width_scale values must lie within (0, 1] (got {self.encoder_width_scale})")
        # a modality the data lacks is skipped (the corpus's {audio: 0.5} on data without audio); a misspelt one
        # would be too, silently, so names outside the registry are refused
        if unknown := sorted(k for k in self.encoder_width_scale if k.partition(".")[0] not in MODALITIES):
            raise ValueError(f"encoder_width_scale: {', '.join(unknown)} is not a modality "
                             f"(registered: {', '.join(MODALITIES)})")
        if self.init == "scratch" and (layers := sorted(k for k in self.encoder_width_scale if "." in k)):
            raise ValueError(f"encoder_width_scale: {', '.join(layers)} names a layer: init scratch scales whole "
                             f"encoders (a layer's own share needs init: pruned)")
        if self.map_weight and self.teacher_views != "augmented":
            raise ValueError("map_weight needs teacher_views: augmented (the teacher's maps of the student's inputs)")
        levels = self.robustness_levels
        if any(not 0.0 <= x <= 1.0 for x in levels) or levels != sorted(set(levels)):
            raise ValueError(f"robustness_levels must be increasing, distinct, within 0..1 (got {levels})")
        return self


class CompressParams(Strict):
    seed: int = Field(0, ge=0)
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    prefer: Literal["size", "latency"] = "size"
    threads: int = Field(2, ge=0, le=256)
    latency_runs: int = Field(50, ge=5, le=100_000)
    prune: Prune = Prune()
    quantize: Quantize = Quantize()
    distill: Distill = Distill()


class DriftMonitor(Strict):
    """The bundle's drift monitor (predict.py --monitor): its threshold, calibrated on held-out windows."""
    window_rows: int = Field(500, ge=20)
    windows: int = Field(400, ge=20, le=100_000)
    false_alarm: float = Field(0.05, gt=0.0, lt=0.5)


class ExportParams(Strict):
    parity_samples: int = Field(256, ge=1)
    max_abs_logit_diff: float = Field(1e-4, gt=0.0)
    max_predictor_accuracy_gap: float = Field(0.005, ge=0.0, le=1.0)
    min_conversion_agreement: float = Field(0.995, ge=0.0, le=1.0)
    max_rows_per_request: int = Field(10_000, ge=1)
    max_item_mb: float = Field(64.0, gt=0.0)
    max_request_mb: float = Field(100.0, gt=0.0)
    predict_batch_size: int = Field(64, ge=1, le=65536)
    registered_model: str | None = Field("mmpipe-fusion", min_length=1)
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    move_alias: Literal["gated", "always", "never"] = "gated"
    monitor: DriftMonitor = DriftMonitor()


class SearchDimension(Strict):
    """One searched parameter: a range (low, high; log-uniform with log; on a grid with step; integers
    when low and high are) or a list of choices."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[str | bool | int | float] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> "SearchDimension":
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("give either choices or low/high (log, step), not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"needs low < high or choices (got low {self.low}, high {self.high})")
        elif self.log and self.low <= 0:
            raise ValueError(f"log needs low > 0 (got {self.low})")
        elif self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @model_serializer(mode="wrap")
    def _as_written(self, handler):  # as params.yaml spells it: {low, high, log: true} or {choices: [...]}
        return {k: v for k, v in handler(self).items() if v is not None and not (k == "log" and v is False)}

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(float(v).is_integer() for v in (self.low, self.high)) and \
            (self.step is None or float(self.step).is_integer())


class Pruner(Strict):
    kind: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0)   # median: trials that finish before any is pruned
    warmup_epochs: int = Field(2, ge=0)    # epochs every trial trains before it can be pruned (hyperband: min resource)


class TuneParams(Strict):
    trials: int = Field(20, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0)
    metric: Literal["headline", "val_accuracy", "val_loss"] = "headline"
    seed: int = Field(0, ge=0)
    study: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    pruner: Pruner = Pruner()
    enqueue: list[dict[str, str | bool | int | float]] = Field(default_factory=list)
    run_best: bool = True
    space: dict[str, SearchDimension] = Field(default_factory=lambda: {
        "train.lr": SearchDimension(low=3e-4, high=1e-2, log=True),
        "train.weight_decay": SearchDimension(low=1e-4, high=1e-1, log=True),
        "train.modality_dropout": SearchDimension(low=0.0, high=0.5),
        "model.dropout": SearchDimension(low=0.0, high=0.5),
        "model.fusion": SearchDimension(choices=list(FUSIONS))}, min_length=1)


FIXED: dict[str, type[Strict]] = {"pretrain": PretrainParams, "train": TrainParams, "evaluate": EvaluateParams,
                                  "compress": CompressParams,
                                  "export": ExportParams, "tune": TuneParams}
# Sections with a subsection per registered modality (model's are under model.encoders).
PER_MODALITY: dict[str, type[Strict]] = {"data": DataBase, "clean": CleanBase, "preprocess": PreprocessBase,
                                         "model": ModelBase}
_built: dict[tuple, type[Strict]] = {}


def schema(section: str) -> type[Strict]:
    """The schema of ``section``: fixed, or assembled from the registry (each modality module's
    ``PARAMS[section]`` as the subsection named after it)."""
    if section in FIXED:
        return FIXED[section]
    key = (section, tuple((m, id(module)) for m, module in MODALITIES.items()))
    if key not in _built:
        fields: dict[str, Any] = {m: (module.PARAMS[section], module.PARAMS[section]())
                                  for m, module in MODALITIES.items() if section in module.PARAMS}
        if section == "model":
            encoders = create_model("Encoders", __base__=Strict, **fields)
            fields = {"encoders": (encoders, encoders())}
        base = PER_MODALITY[section]
        _built[key] = create_model(base.__name__.replace("Base", "Params"), __base__=base, **fields)
    return _built[key]


def __getattr__(name: str) -> type[Strict]:
    """``params.CleanParams`` and the like: the registry-assembled schemas."""
    for section, base in PER_MODALITY.items():
        if name == base.__name__.replace("Base", "Params"):
            return schema(section)
    raise AttributeError(name)


def sections() -> tuple[str, ...]:
    return (*PER_MODALITY, *FIXED)


def _describe(err: dict[str, Any], section: str) -> str:
    key = ".".join([section, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    message = err["msg"].removeprefix("Value error, ")
    if message.startswith(f"{section}."):  # a validator that names the exact key itself
        return message + got_text
    return f"{key}: {message}{got_text}"


# ---- presets: one param for how much compute a run spends (AutoGluon's presets, for this pipeline) ----
# Each preset gives the keys below their values where params.yaml leaves them to `auto` (or out); a
# number in params.yaml wins. balanced is what the built-in corpus is tuned for (the schema defaults);
# each modality module adds its encoder's width (its PRESETS). Time and accuracy of each: README
# "Presets", measured on the built-in corpus.
PRESETS: dict[str, dict[str, dict]] = {
    "quick": {"train": {"epochs": 15, "patience": 4, "baselines": False},
              "evaluate": {"noise_levels": [0.0, 0.5, 1.0]}},
    "balanced": {"train": {"epochs": 30, "patience": 6, "baselines": True},
                 "evaluate": {"noise_levels": [round(0.1 * i, 1) for i in range(11)]}},
    "best": {"train": {"epochs": 60, "patience": 12, "baselines": True},
             "evaluate": {"noise_levels": [round(0.05 * i, 2) for i in range(21)]}},
}
DEFAULT_PRESET = "balanced"


def preset_values(preset: str, section: str) -> dict:
    """The values ``preset`` gives ``section``'s keys (the modalities' encoder widths under model.encoders)."""
    values = dict(PRESETS[preset].get(section, {}))
    if section == "model":
        widths = {m: module.PRESETS[preset]["model"] for m, module in MODALITIES.items()
                  if preset in getattr(module, "PRESETS", {})}
        values["encoders"] = widths
    return values


def _fill(raw: dict, values: dict) -> dict:
    out = dict(raw)
    for key, value in values.items():
        if isinstance(value, dict):
            inner = out.get(key)
            out[key] = _fill(inner if isinstance(inner, dict) else {}, value) if inner is None or isinstance(inner, dict) \
                else inner  # not a mapping: left for the schema to refuse in one line
        elif key not in out or out[key] == "auto":
            out[key] = value
    return out


def check_preset(preset: Any, file: str = PARAMS_FILE) -> str:
    if preset not in PRESETS:
        raise PipelineError(f"{file}: preset: must be one of {', '.join(PRESETS)} (got {preset!r})")
    return preset


def validate(section: str, raw: Any, file: str = PARAMS_FILE, preset: str = DEFAULT_PRESET):
    """Validate one section's raw mapping, the keys it leaves to ``auto`` (or out) given ``preset``'s
    values; raise PipelineError with one line per problem."""
    section_schema = schema(section)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{file}: {section}: expected a mapping, got {type(raw).__name__}")
    raw = _fill(raw, preset_values(check_preset(preset, file), section))
    try:
        return section_schema.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{file}: {_describe(e, section)}" for e in exc.errors()]
        raise PipelineError("\n".join(lines)) from None


def load(section: str, path: str | Path = PARAMS_FILE):
    """Read ``path`` and return the validated ``section``."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found (run from the repository root)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if section not in doc:
        raise PipelineError(f"{path}: section '{section}' is missing")
    return validate(section, doc[section], str(path), doc.get("preset", DEFAULT_PRESET))
