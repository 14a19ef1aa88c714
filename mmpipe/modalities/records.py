"""Tabular records -> what clean and preprocess make of them, with nothing but the standard library
and numpy: the one implementation used by the pipeline **and** shipped as is in the deployment
bundle (next to portable.py), so the standalone predictor turns a request's fields into the
features the model was trained on, under the same rules.

A record is a JSON object of cells: ``{"age": 31, "country": "FR"}``. Each column is *numeric* or
*categorical* (``rules["columns"]``: declared in ``data.tabular.columns`` or decided by
``auto_types``). ``decode_record`` coerces each cell to its column's type: an empty cell is
missing, a bad one (a word in a numeric column, a nested value) is made missing and reported.
``RecordEncoding`` turns coerced records into two arrays: robust-standardised numbers with a
missing indicator per numeric column, and category ids (0 = missing, 1 = ``<unk>``, 2.. = the
train split's categories seen at least ``min_count`` times).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any, Iterable, Mapping

import numpy as np

if __package__:  # inside mmpipe
    from .portable import RejectedInput, json_object, normalize
else:  # in the bundle: portable.py sits next to this file
    from portable import RejectedInput, json_object, normalize  # type: ignore[no-redef]

NUMERIC, CATEGORICAL = "numeric", "categorical"
MISSING_ID, UNKNOWN_ID = 0, 1  # category ids before the vocabulary's
# auto_types: a column is numeric when at least this share of its non-empty cells are numbers
# (so a few typos in a numeric column are reported as bad cells, not turned into categories)
AUTO_NUMERIC_SHARE = 0.95


def _empty(value: Any) -> bool:
    """A missing cell: null or blank text. (NaN is not "missing" here: the manifest readers and the
    REST adapter turn their own missing-value markers into null; a NaN that reaches a record was sent
    as a value, and is reported as the bad cell it is.)"""
    return value is None or (isinstance(value, str) and not value.strip())


def _finite(value: Any) -> float | None:
    """A real number (bool excluded) as a finite float; None for anything else, including numbers
    too large for a float (a 400-digit JSON integer) and +-inf / NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if math.isfinite(number) else None


def as_number(value: Any) -> float | None:
    """A cell as a finite number, or None when it is not one ("31", " 4.5 ", 31 and 4.5 are)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    return _finite(value)


def as_category(value: Any, max_chars: int) -> str | None:
    """A cell as a category: text normalised (NFC, no control characters, single spaces), numbers
    written as the integers they are (3.0 -> "3"), booleans as true/false; None for what is none
    of these (nested values, bytes, non-finite or float-overflowing numbers)."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, str):
        return normalize(value)[:max_chars].rstrip() or None
    number = _finite(value)
    if number is None:
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def _shown(value: Any) -> str:
    """A cell for a message: at most 40 characters, whatever its type or size."""
    if isinstance(value, str):
        text = json.dumps(value[:40], ensure_ascii=False)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = repr(value) if not isinstance(value, int) or value.bit_length() < 128 else f"a {value.bit_length()}-bit integer"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=lambda v: f"<{type(v).__name__}>")
        except (ValueError, TypeError, RecursionError):
            text = f"<{type(value).__name__}>"
    return text if len(text) <= 40 else text[:37] + "..."


def _what(value: Any) -> str:
    """What a cell is, when its shown value does not say it ("" when it does)."""
    if isinstance(value, (dict, list, tuple)):
        return " (a nested value)"
    if isinstance(value, (bytes, bytearray)):
        return " (bytes)"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and _finite(value) is None:
        return " (too large for a float)" if isinstance(value, numbers.Integral) else " (not finite)"
    return ""


def cells_size(obj: Mapping[str, Any]) -> int:
    """UTF-8 bytes of a record's cells as the JSON object collect stores (empty cells left out): how a
    record that arrives as columns (CSV manifest, REST request) is held to ``max_bytes``."""
    present = {k: v for k, v in obj.items() if not _empty(v)}
    text_bytes = sum(len(k) + (len(v) if isinstance(v, str) else 0) for k, v in present.items())
    if text_bytes > (1 << 24):  # surely over any sane limit: not worth serialising to measure it
        return text_bytes
    return len(json.dumps(present, ensure_ascii=False, default=lambda v: f"<{type(v).__name__}>").encode("utf-8", "surrogatepass"))


def parse_object(data: bytes | str | Mapping, rules: Mapping[str, Any]) -> dict[str, Any]:
    """Raw bytes / JSON text / a mapping -> the JSON object, bounded by ``rules["max_bytes"]``."""
    if isinstance(data, Mapping):  # cells that arrived as columns: the same byte limit as a JSON record
        size = cells_size(data)
    else:
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > rules["max_bytes"]:
        raise RejectedInput("tabular_too_large", f"tabular record is {size:,} bytes > clean.tabular.max_bytes={rules['max_bytes']:,}")
    if isinstance(data, Mapping):
        return dict(data)
    try:
        obj = json_object(data)
    except ValueError as exc:
        raise RejectedInput("tabular_invalid", f"tabular record: {exc}") from None
    return obj


def decode_record(data: bytes | str | Mapping, rules: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """One record -> (its usable cells coerced to their column's type, in column order; the bad
    cells as (code, reason), each made missing). Keys that are not columns are ignored. Raises
    RejectedInput when the record is unreadable or no cell is usable."""
    obj = parse_object(data, rules)
    values: dict[str, Any] = {}
    dropped: list[tuple[str, str]] = []
    for column, kind in rules["columns"].items():
        value = obj.get(column)
        if _empty(value):
            continue
        coerced = as_number(value) if kind == NUMERIC else as_category(value, rules["max_chars"])
        if coerced is None:
            wanted = "a finite number" if kind == NUMERIC else "a text, a finite number or a boolean"
            dropped.append(("tabular_bad_cell", f"column '{column}': {_shown(value)}{_what(value)} is not {wanted} "
                                                "(made missing)"))
        else:
            values[column] = coerced
    if not values:
        detail = f" ({'; '.join(reason for _, reason in dropped)})" if dropped else ""
        raise RejectedInput("tabular_empty", f"no tabular column has a usable value{detail}")
    return values, dropped


def auto_types(objects: Iterable[Mapping[str, Any]], max_columns: int) -> dict[str, str]:
    """Column -> numeric | categorical for the keys of ``objects`` (the first ``max_columns`` seen):
    numeric when at least AUTO_NUMERIC_SHARE of the column's non-empty cells are numbers."""
    numbers: dict[str, int] = {}
    filled: dict[str, int] = {}
    for obj in objects:
        for key, value in obj.items():
            if key not in filled:
                if len(filled) >= max_columns:
                    continue
                numbers[key] = filled[key] = 0
            if not _empty(value):
                filled[key] += 1
                numbers[key] += as_number(value) is not None
    return {key: NUMERIC if filled[key] and numbers[key] >= AUTO_NUMERIC_SHARE * filled[key] else CATEGORICAL
            for key in sorted(filled)}


class RecordEncoding:
    """Coerced records -> (numeric (n, 2k) float32: robust-standardised values then missing
    indicators; categories (n, c) int32), from a state fitted on the train split (``fit``)."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = state
        self.numeric = [c for c in state["columns"] if c["type"] == NUMERIC]
        self.categorical = [c for c in state["columns"] if c["type"] == CATEGORICAL]
        self.ids = [{value: i + 2 for i, value in enumerate(c["categories"])} for c in self.categorical]

    @staticmethod
    def fit(rows: list[Mapping[str, Any]], columns: Mapping[str, str], min_count: int, max_categories: int,
            clip: float) -> dict[str, Any]:
        """The state from the train split's coerced records: per numeric column its median and
        scale (IQR / 1.349, i.e. the standard deviation of normal data, robust to outliers; the
        standard deviation when the IQR is 0; 1 when both are), per categorical column its
        categories seen at least ``min_count`` times (most frequent first, at most ``max_categories``)."""
        fitted = []
        for column, kind in columns.items():
            cells = [row[column] for row in rows if column in row]
            if kind == NUMERIC:
                x = np.asarray(cells, np.float64)
                if len(x):
                    median = float(np.median(x))
                    q1, q3 = np.percentile(x, [25, 75])
                    scale = float((q3 - q1) / 1.349) or float(x.std()) or 1.0
                else:
                    median, scale = 0.0, 1.0
                fitted.append({"name": column, "type": NUMERIC, "median": median, "scale": scale})
            else:
                counts: dict[str, int] = {}
                for value in cells:
                    counts[value] = counts.get(value, 0) + 1
                kept = sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], v))
                fitted.append({"name": column, "type": CATEGORICAL, "categories": kept[:max_categories]})
        return {"columns": fitted, "clip": clip}

    @property
    def cardinalities(self) -> list[int]:
        """Ids per categorical column (missing and <unk> included)."""
        return [len(c["categories"]) + 2 for c in self.categorical]

    def encode(self, rows: list[Mapping[str, Any] | None]) -> tuple[np.ndarray, np.ndarray]:
        """Coerced records (None = unavailable: zeros) -> (numeric, categories)."""
        k, clip = len(self.numeric), self.state["clip"]
        numeric = np.zeros((len(rows), 2 * k), np.float32)
        categories = np.zeros((len(rows), len(self.categorical)), np.int32)
        for i, row in enumerate(rows):
            if row is None:
                continue
            for j, column in enumerate(self.numeric):
                value = row.get(column["name"])
                if value is None:
                    numeric[i, k + j] = 1.0
                else:
                    numeric[i, j] = min(max((value - column["median"]) / column["scale"], -clip), clip)
            for j, column in enumerate(self.categorical):
                value = row.get(column["name"])
                categories[i, j] = MISSING_ID if value is None else self.ids[j].get(value, UNKNOWN_ID)
        return numeric, categories


class TabularInput:
    """The bundle predictor's input for a record modality: a JSON object (``--tabular '{"age": 31}'``)
    or, in a manifest or REST request, the columns ``columns`` of the row."""

    KIND = "record"

    def __init__(self, arrays: list[str], state: dict[str, Any], rules: dict[str, Any], folder: Any):
        self.arrays, self.rules = arrays, rules
        self.encoding = RecordEncoding(state)

    @property
    def columns(self) -> list[str]:
        return list(self.rules["columns"])

    def features(self, value: bytes | str | Mapping) -> dict[str, np.ndarray] | None:
        """The record's arrays; None when none of its cells is usable (the modality is unavailable,
        as clean makes it). Bad cells are made missing, as clean makes them."""
        try:
            values, _ = decode_record(value, self.rules)
        except RejectedInput as exc:
            if exc.code == "tabular_empty":
                return None
            raise
        numeric, categories = self.encoding.encode([values])
        produced = ([numeric[0]] if self.encoding.numeric else []) + ([categories[0].astype(np.int64)] if self.encoding.categorical else [])
        return dict(zip(self.arrays, produced))

    def statistics(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        """The drift monitor's statistics (inputs.py: ``Input.statistics``): each column as the model takes it —
        a numeric one's standardised value (NaN where missing), a categorical one's category id."""
        out: dict[str, tuple[str, np.ndarray]] = {}
        names = iter(self.arrays)
        if self.encoding.numeric:
            numeric = np.asarray(arrays[next(names)], np.float64)
            k = len(self.encoding.numeric)
            for j, column in enumerate(self.encoding.numeric):
                out[column["name"]] = ("numeric", np.where(numeric[:, k + j] > 0, np.nan, numeric[:, j]))
        if self.encoding.categorical:
            categories = np.asarray(arrays[next(names)], np.float64)
            for j, column in enumerate(self.encoding.categorical):
                out[column["name"]] = ("categorical", categories[:, j])
        return out
