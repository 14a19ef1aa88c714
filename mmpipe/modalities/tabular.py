"""Tabular modality — structured metadata next to the photo, the recording and the description
(price, age, device, country): its params, column types and cell coercion (clean), robust
standardisation and category vocabularies fitted on train (preprocess), corruptions for the
robustness sweep (evaluate), its encoder (embeddings + MLP) and its predictor input.

A sample's tabular item is one JSON object of cells. It comes from a manifest's columns (declared
in ``data.tabular.columns``, or all the columns the pipeline does not otherwise read with ``auto``),
from a ``tabular`` manifest cell or ``tabular_file`` holding the object, or from a folder's
``<label>/<stem>.json``. docs/data-format.md spells out the rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from mmpipe.modalities import records
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import RejectedInput
from mmpipe.schema import Strict

NAME = "tabular"
EXTENSIONS = (".json",)
STORED_AS = pa.string()  # the coerced record as canonical JSON (missing cells left out)
INFO_COLUMNS = {"cells": pa.int32()}  # usable cells of the record
INLINE = True  # a manifest's tabular cell is the JSON object itself
PREDICTOR_INPUT = (Path(records.__file__), "TabularInput")
NUMERIC, CATEGORIES = f"{NAME}_numeric", f"{NAME}_categories"  # its arrays (each only when it has columns)
ColumnType = Literal["numeric", "categorical"]


# --------------------------------------------------------------------------- params


class Data(Strict):
    # name -> numeric | categorical, or "auto": every manifest column the pipeline does not otherwise
    # read, typed by records.auto_types. JSON items bring their own keys (typed by the same rule)
    # unless columns are declared here.
    columns: Literal["auto"] | dict[str, ColumnType] = Field(default_factory=dict)

    @field_validator("columns", mode="before")
    @classmethod
    def _check_columns(cls, value: Any) -> Any:
        if value == "auto" or value is None:
            return value or {}
        if not isinstance(value, dict):
            raise ValueError(f"expected 'auto' or a mapping of column -> numeric | categorical, got {value!r}")
        bad = {c: t for c, t in value.items() if t not in ("numeric", "categorical")}
        if bad:
            column, kind = next(iter(bad.items()))
            raise ValueError(f"column '{column}': type must be numeric or categorical, got {kind!r}")
        return value


class Clean(Strict):
    max_bytes: int = Field(65_536, ge=2)  # a record's JSON, bytes
    max_columns: int = Field(256, ge=1, le=100_000)  # auto: keys beyond the first this many are ignored
    max_chars: int = Field(200, ge=1)  # categorical values are cut to this many characters


class Rules(Clean):
    """clean.tabular plus the column types resolved over the raw items (``resolve_rules``)."""
    columns: dict[str, ColumnType] = Field(default_factory=dict)


class Preprocess(Strict):
    min_count: int = Field(5, ge=1)  # categories seen fewer times in train become <unk>
    max_categories: int = Field(1000, ge=1, le=1_000_000)  # per column, most frequent first
    clip: float = Field(5.0, gt=0)  # standardised numbers are clipped to [-clip, clip]


class Encoder(Strict):
    embed_dim: int = Field(8, ge=1, le=1024)  # per categorical column
    width: int = Field(64, ge=4, le=4096)
    cell_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # share of cells made missing while training


PARAMS = {"data": Data, "clean": Clean, "preprocess": Preprocess, "model": Encoder}

# the encoder's width under each preset (params.PRESETS; balanced = the schema default)
PRESETS = {"quick": {"model": {"width": 32}}, "balanced": {"model": {"width": 64}},
           "best": {"model": {"width": 96}}}
RULES = Rules  # what clean's rules become once the column types are resolved (resolve_rules)


def describe_rules(rules: dict) -> str:
    columns = ", ".join(f"{c} ({t})" for c, t in rules["columns"].items())
    return f"a JSON object (or manifest/request columns) of the cells {columns}; at most {rules['max_bytes']:,} bytes"


# --------------------------------------------------------------------------- collect and clean


def record_columns(cfg: Data, manifest_columns: list[str], used: set[str]) -> list[str]:
    """The manifest columns gathered into the row's record."""
    if cfg.columns == "auto":
        return [c for c in manifest_columns if c not in used]
    missing = [c for c in cfg.columns if c not in manifest_columns]
    if missing and len(missing) < len(cfg.columns):
        print(f"collect: data.tabular.columns not in the manifest (always missing): {', '.join(missing)}")
    return [c for c in cfg.columns if c in manifest_columns]


def _objects(raw_items: Iterable[bytes], cfg: Clean) -> Iterable[dict]:
    for data in raw_items:
        try:
            yield records.parse_object(data, cfg.model_dump())
        except RejectedInput:
            continue  # clean rejects it, item by item


def resolve_rules(cfg: Clean, declared: dict, raw_items: Iterable[bytes]) -> Rules:
    """Declared column types as declared; with none declared (or ``auto``), the raw items' keys
    typed by ``records.auto_types`` (decided on the cells' syntax over all rows: no labels, no
    statistics — those are fitted on the train split by preprocess)."""
    columns = declared.get("columns", "auto")
    if not columns or columns == "auto":
        columns = records.auto_types(_objects(raw_items, cfg), cfg.max_columns)
    return Rules(**cfg.model_dump(), columns=columns)


def clean(data: bytes, cfg: Rules) -> Cleaned:
    """Coerce each cell to its column's type (records.decode_record): bad cells made missing and
    listed; an object with no usable cell is rejected (the modality is then missing)."""
    rules = cfg.model_dump()
    if "columns" not in rules:  # rules not resolved over a data set (one item alone): its own keys, typed by rule
        rules["columns"] = records.auto_types([records.parse_object(data, rules)], cfg.max_columns)
    values, dropped = records.decode_record(data, rules)
    out = json.dumps(values, ensure_ascii=False).encode("utf-8")
    return Cleaned(out, converted=out != data, info={"cells": len(values)}, dropped=dropped)


def _as_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# export's parity check: every cell as the text a CSV manifest or a form would send
PARITY_VARIANTS = {"cells as text": lambda raw: json.dumps({k: _as_text(v) for k, v in json.loads(raw).items()}).encode()}


# --------------------------------------------------------------------------- features (preprocess)


class Features:
    """Coerced records -> robust-standardised numbers + missing indicators (float32) and category
    ids (int32), fitted on the train split only (records.RecordEncoding)."""

    gpu = False
    stats = None  # the standardisation is the featurizer's own (robust), not preprocess's mean/std

    def __init__(self, cfg, dataset: dict):
        self.cfg = cfg
        self.columns = dataset["clean_rules"][NAME]["columns"] if dataset else {}
        self.encoding: records.RecordEncoding | None = None
        self._arrays()

    def _arrays(self) -> None:
        kinds = list(self.columns.values())
        n_numeric, n_categorical = kinds.count(records.NUMERIC), kinds.count(records.CATEGORICAL)
        self.arrays = ({NUMERIC: ((2 * n_numeric,), np.float32)} if n_numeric else {}) | \
                      ({CATEGORIES: ((n_categorical,), np.int32)} if n_categorical else {})

    def fit(self, train_values: list[str]) -> None:
        state = records.RecordEncoding.fit([json.loads(v) for v in train_values], self.columns, self.cfg.min_count,
                                           self.cfg.max_categories, self.cfg.clip)
        self.encoding = records.RecordEncoding(state)

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> "Features":
        features = cls(None, {})
        features.columns = {c["name"]: c["type"] for c in state["columns"]}
        features.encoding = records.RecordEncoding(state)
        features._arrays()
        return features

    def transform(self, items: list[str | None], ids: list[str], noise: Callable | None = None, *,
                  errors: dict[int, str], device: str = "cpu") -> dict[str, np.ndarray]:
        """``noise`` (evaluate's robustness sweep) maps the ``Cells`` of the present records."""
        numeric, categories = self.encoding.encode([None if v is None else json.loads(v) for v in items])
        if noise is not None:
            present = [i for i, v in enumerate(items) if v is not None]
            cells = noise(Cells(numeric[present], categories[present], self.encoding.cardinalities))
            numeric[present], categories[present] = cells.numeric, cells.categories
        return {name: values for name, values in ((NUMERIC, numeric), (CATEGORIES, categories)) if name in self.arrays}

    def state(self) -> dict:
        return dict(self.encoding.state)

    def save(self, folder) -> None:
        pass  # the state is all JSON

    @staticmethod
    def state_files(state: dict) -> list[str]:
        return []


# --------------------------------------------------------------------------- corruptions (evaluate)


class Cells:
    """Encoded records: ``numeric`` (n, 2k) values then missing indicators; ``categories`` (n, c) ids."""

    def __init__(self, numeric: np.ndarray, categories: np.ndarray, cardinalities: list[int]):
        self.numeric, self.categories, self.cardinalities = numeric.copy(), categories.copy(), cardinalities

    @property
    def k(self) -> int:
        return self.numeric.shape[1] // 2


def numeric_noise(cells: Cells, level: float, rng: np.random.Generator) -> Cells:
    """Gaussian noise of standard deviation 2 x ``level`` (in robust standard units) on present numbers."""
    if level > 0 and cells.k:
        present = cells.numeric[:, cells.k:] == 0
        noise = rng.normal(0.0, 2.0 * level, (len(cells.numeric), cells.k)).astype(np.float32)
        cells.numeric[:, :cells.k] += np.where(present, noise, 0.0).astype(np.float32)
    return cells


def category_swaps(cells: Cells, level: float, rng: np.random.Generator) -> Cells:
    """Each present category replaced, with probability ``level``, by a random one of its column's."""
    for j, cardinality in enumerate(cells.cardinalities):
        column = cells.categories[:, j]
        hit = (column != records.MISSING_ID) & (rng.random(len(column)) < level)
        column[hit] = rng.integers(records.UNKNOWN_ID, max(cardinality, records.UNKNOWN_ID + 1), int(hit.sum()))
    return cells


def masking(cells: Cells, level: float, rng: np.random.Generator) -> Cells:
    """Each cell made missing with probability ``level`` (an empty form field, a lost join)."""
    if level > 0 and cells.k:
        hit = rng.random((len(cells.numeric), cells.k)) < level
        cells.numeric[:, :cells.k][hit] = 0.0
        cells.numeric[:, cells.k:][hit] = 1.0
    if level > 0 and cells.categories.size:
        cells.categories[rng.random(cells.categories.shape) < level] = records.MISSING_ID
    return cells


CORRUPTIONS = {"numeric_noise": numeric_noise, "category_swaps": category_swaps, "masking": masking}


# --------------------------------------------------------------------------- encoder (train)


def build_encoder(state: dict, cfg: Encoder, model):
    from mmpipe.models.encoders import RecordMLP  # torch only where a model is built

    encoding = records.RecordEncoding(state)
    return RecordMLP(len(encoding.numeric), encoding.cardinalities, model.dim, cfg.embed_dim, cfg.width,
                     cfg.cell_dropout if model.augment else 0.0)
