"""Manifests: a .csv / .parquet / .jsonl table of samples (docs/data-format.md), read under bounds
(bytes, rows, columns, checked before a table is built) and turned, row by row, into the row specs
collect fetches: references resolved against the manifest's folder or URL, inline content kept,
record modalities' columns gathered into one JSON object, ids given or derived from the row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from mmpipe.data.fetch import FetchError, Policy, fetch, is_url
from mmpipe.errors import PipelineError, redact
from mmpipe.modalities import MODALITIES, names
from mmpipe.modalities.portable import json_object, printable

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl")
KEY_COLUMNS = ("label", "id", "split", "group")  # "label": the target column (data.target.column)


def file_columns() -> dict[str, str]:
    """Inline modalities (text) may instead name a file in a "<modality>_file" column."""
    return {f"{m}_file": m for m, module in MODALITIES.items() if module.INLINE}


def manifest_columns(target_column: str = "label") -> tuple[str, ...]:
    """The columns the pipeline reads for a purpose of their own (never gathered as metadata: the target
    least of all, which would leak the answer into the inputs)."""
    return (target_column, *KEY_COLUMNS[1:], *names(), *file_columns())


def record_columns(params, columns: list[str]) -> dict[str, list[str]]:
    """Record modality (one whose ``record_columns`` hook is set, e.g. tabular) -> the manifest columns gathered
    into its JSON item, under its ``data.<modality>`` params."""
    used, out = set(manifest_columns(params.target.column)), {}
    for m, module in MODALITIES.items():
        if module.record_columns is not None:
            out[m] = module.record_columns(getattr(params, m), columns, used)
            used |= set(out[m])
    return out


def policy(params, root: str | None = None) -> Policy:
    """The fetch policy of the data params; ``root``: the source's folder or base URL (used when
    data.confine_to_root is on)."""
    return Policy(max_bytes=int(params.max_file_mb * 1e6), timeout_s=params.fetch_timeout_s,
                  allowed_protocols=tuple(params.allowed_protocols), root=root if params.confine_to_root else None)


def _text(value: Any) -> str | None:
    """A manifest cell as a string, or None when empty (None/NaN/pd.NA/NaT). Numbers read as floats
    only because their column has a null (JSONL, Parquet) are written as the integers they are."""
    if isinstance(value, np.ndarray):  # a Parquet list cell
        value = value.tolist()
    if value is None or isinstance(value, (list, tuple, dict)):
        return None if value is None else json.dumps(value, default=str)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    if pd.isna(value):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclasses.dataclass
class Manifest:
    """A manifest read and bounded: its columns, its row count, each record modality's gathered columns,
    and its rows (a mapping column -> cell per row; an absent key is an empty cell)."""

    columns: list[str]
    n_rows: int
    records: dict[str, list[str]]
    rows: Iterable[dict[str, Any]]
    target_column: str = "label"


def _too_many(source: str, what: str, limit: int, key: str) -> PipelineError:
    return PipelineError(f"{redact(source)}: manifest has more than {limit:,} {what} (data.{key}): "
                         "split it, or raise the limit")


def _jsonl(data: bytes, source: str, max_rows: int, max_columns: int) -> tuple[list[str], list[dict[str, Any]]]:
    """JSON Lines parsed line by line, each row kept as its own object (lines that each bring their own
    keys would make a dense table of every key by every row). Pandas' reader is not used: it turns an
    integer column with a null into floats."""
    records, keys = [], {}
    for number, line in enumerate(data.decode("utf-8", "surrogateescape").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json_object(line)
        except ValueError as exc:
            raise PipelineError(f"{source}: line {number}: {exc}") from None
        if not all(key.isascii() for key in record):  # invalid UTF-8 in a key: shown as escapes
            record = {printable(key): value for key, value in record.items()}
        if len(records) == max_rows:
            raise _too_many(source, "rows", max_rows, "max_manifest_rows")
        keys.update(dict.fromkeys(record))
        if len(keys) > max_columns:
            raise _too_many(source, "distinct columns (keys over all lines)", max_columns, "max_manifest_columns")
        records.append(record)
    return list(keys), records


def _csv(data: bytes, source: str, max_rows: int, max_columns: int) -> pd.DataFrame:
    """A CSV manifest, its header counted before pandas reads it, at most ``max_rows`` rows read.
    An empty cell means "absent"; any other text is kept verbatim (labels with spaces too). Invalid
    UTF-8 is carried as surrogates so that clean can reject that one cell. The header is read as a
    row: pandas cannot make column names of invalid UTF-8."""
    header = next(csv.reader(io.TextIOWrapper(io.BytesIO(data), "utf-8", "surrogateescape", newline="")), [])
    if len(header) > max_columns:
        raise _too_many(source, "columns", max_columns, "max_manifest_columns")
    frame = pd.read_csv(io.BytesIO(data), dtype=object, keep_default_na=False, na_values=[""], encoding="utf-8",
                        encoding_errors="surrogateescape", header=None, nrows=max_rows + 2)
    if len(frame) > max_rows + 1:
        raise _too_many(source, "rows", max_rows, "max_manifest_rows")
    frame.columns = [printable(c) for c in frame.iloc[0]] if len(frame) else []
    return frame.iloc[1:].reset_index(drop=True)


def _parquet(data: bytes, source: str, max_rows: int, max_columns: int) -> pd.DataFrame:
    """A Parquet manifest, its row and column counts read from the footer before any data."""
    file = pq.ParquetFile(io.BytesIO(data))
    if len(file.schema_arrow) > max_columns:
        raise _too_many(source, "columns", max_columns, "max_manifest_columns")
    if file.metadata.num_rows > max_rows:  # a few KB of run-length encoded Parquet can hold millions of rows
        raise _too_many(source, f"rows ({file.metadata.num_rows:,})", max_rows, "max_manifest_rows")
    return file.read().to_pandas()


def _frame_rows(frame: pd.DataFrame) -> Iterator[dict[str, Any]]:
    columns = list(frame.columns)
    for values in frame.itertuples(index=False, name=None):
        yield dict(zip(columns, values))


def read_manifest(source: str, params) -> Manifest:
    """Read a .csv/.parquet/.jsonl manifest (local or URL, fetched under the data params' policy),
    bounded by data.max_manifest_mb (bytes), data.max_manifest_rows and data.max_manifest_columns
    (checked before the table is built); return it with each record modality's gathered columns
    (``record_columns``)."""
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise PipelineError(f"{redact(source)}: unsupported manifest type '{suffix}' (expected {', '.join(MANIFEST_SUFFIXES)})")
    manifest_policy = dataclasses.replace(policy(params), max_bytes=int(params.max_manifest_mb * 1e6))
    try:
        data = fetch(source, manifest_policy)
    except FetchError as exc:
        if exc.code == "not_found":
            raise PipelineError(f"data.source: {redact(source)} does not exist") from None
        reason = exc.reason.replace("data.max_file_mb", "data.max_manifest_mb")
        raise PipelineError(f"data.source: cannot read the manifest: {reason}") from None
    bounds = (params.max_manifest_rows, params.max_manifest_columns)
    try:
        if suffix == ".jsonl":
            columns, objects = _jsonl(data, redact(source), *bounds)
            n_rows, rows = len(objects), objects
        else:
            frame = _csv(data, source, *bounds) if suffix == ".csv" else _parquet(data, source, *bounds)
            columns, n_rows, rows = [printable(c) for c in frame.columns], len(frame), None
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"{redact(source)}: cannot read manifest: {printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
    del data
    if rows is None:
        frame.columns = columns
        rows = _frame_rows(frame)
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise PipelineError(f"{redact(source)}: manifest has the column '{duplicated[0]}' more than once")
    target = params.target.column
    if target not in columns:
        shown = ", ".join(columns[:30]) + (f" and {len(columns) - 30:,} more" if len(columns) > 30 else "")
        raise PipelineError(f"{redact(source)}: manifest has no '{target}' column (data.target.column; columns: {shown})")
    records = record_columns(params, columns)
    gathered = {c for record in records.values() for c in record}
    unknown = [c for c in columns if c not in manifest_columns(target) and c not in gathered]
    if unknown:
        hint = "".join(f" (data.{m}.columns: auto gathers them as {m})" for m in records)
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20:,} more" if len(unknown) > 20 else "")
        print(f"collect: ignoring manifest columns not used by the pipeline: {shown}{hint}")
    if not gathered and not any(c in columns for c in (*names(), *file_columns())):
        raise PipelineError(f"{redact(source)}: manifest has none of the modality columns {', '.join((*names(), *file_columns()))}")
    return Manifest(columns, n_rows, records, rows, target)


def _resolve(ref: str, base: str) -> str:
    """A manifest reference made absolute: against the manifest's base URL or folder."""
    if is_url(ref) or "\x00" in ref:  # (a NUL byte: left as is for fetch to refuse)
        return ref
    if is_url(base):
        return urljoin(base.rstrip("/") + "/", ref)
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else (Path(base) / path).resolve())


def _json_cell(value: Any) -> Any:
    """A manifest cell as a JSON value (None when empty): numbers stay numbers (non-finite ones too,
    written as JSON's NaN/Infinity, so that clean names them as the bad cells they are), nested values
    (JSONL objects/arrays, Parquet lists and structs) stay nested: clean reports them as bad cells,
    exactly as the bundle's predictor does when a request sends one. The rest is text."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_cell(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_cell(v) for v in value]
    return _text(value)


def _record(cells: dict[str, Any]) -> str | None:
    """A row's record columns as one JSON object (None when every cell is empty)."""
    present = {c: v for c, v in ((c, _json_cell(v)) for c, v in cells.items()) if v is not None}
    return json.dumps(present, ensure_ascii=False) if present else None


def _derived_id(label: str | None, cells: list[str | None]) -> str:
    """A manifest row's id from its label and cells: independent of row order."""
    key = json.dumps([label, *cells], ensure_ascii=False)
    return "m-" + hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _key_cell(source: str, row: int, column: str, value: Any) -> str | None:
    """A metadata cell (label/id/split/group); invalid UTF-8 there is a structural error."""
    text = _text(value)
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PipelineError(f"{redact(source)}: row {row}: column '{column}' is not valid UTF-8") from None
    return text


def manifest_base(source: str) -> str:
    """The folder or base URL a manifest's relative references resolve against (and its root)."""
    return source.rsplit("/", 1)[0] if is_url(source) else str(Path(source).resolve().parent)


def manifest_rows(manifest: Manifest, source: str) -> Iterator[dict[str, Any]]:
    """One row spec per manifest row, made as they are consumed (never all held): refs resolved,
    inline content kept, ids given or derived."""
    base = manifest_base(source)
    columns = {"label": manifest.target_column} | {c: c for c in KEY_COLUMNS[1:]}  # key -> its manifest column
    keyed = {k for k, c in columns.items() if c in manifest.columns}
    # column -> (its record modality, its place): a row's cells are gathered from the row's own keys,
    # in column order (a JSONL line holds a few of possibly many keys)
    gathers = {c: (m, k) for m, record in manifest.records.items() for k, c in enumerate(record)}

    for i, row in enumerate(manifest.rows):
        cells = {m: _text(row.get(m)) for m in names()}
        by_modality: dict[str, list[tuple[int, str, Any]]] = {m: [] for m in manifest.records}
        for c, value in row.items():
            if c in gathers:
                m, k = gathers[c]
                by_modality[m].append((k, c, value))
        for m, record in manifest.records.items():
            gathered = _record({c: value for _, c, value in sorted(by_modality[m], key=lambda t: t[0])})
            if gathered is not None and cells[m] is not None:
                cells[m] = ("conflict", f"both '{m}' and its columns {', '.join(record)} are set on this row")
            elif gathered is not None:
                cells[m] = gathered
        files = {m: _text(row.get(c)) for c, m in file_columns().items()}
        key = {k: _key_cell(source, i, c, row.get(c)) if k in keyed else None for k, c in columns.items()}
        spec = {
            "sample_id": key["id"] if key["id"] is not None else _derived_id(key["label"], [*cells.values(), *files.values()]),
            "source_row": i,
            "label": key["label"],
            "split": key["split"],
            "group": key["group"],
        }
        for m, module in MODALITIES.items():
            value, file = cells[m], files.get(m)
            if isinstance(value, tuple):
                spec[m] = value
            elif value is not None and file is not None:
                spec[m] = ("conflict", f"both '{m}' and '{m}_file' are set on this row")
            elif file is not None:
                spec[m] = ("ref", _resolve(file, base))
            elif value is None:
                spec[m] = None
            elif module.INLINE:
                spec[m] = ("inline", value)
            else:
                spec[m] = ("ref", _resolve(value, base))
        yield spec
