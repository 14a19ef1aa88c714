"""collect: turn a source (built-in corpus, manifest or folder) into raw Parquet files.

Output: a few ``part-NNNNN.parquet`` files holding metadata and the raw encoded bytes of every
modality. Nothing is validated here beyond the source's structure: an item that cannot be
fetched is recorded with its error (``<modality>_error``) so that ``clean`` lists it in the
rejects; a source that cannot be read at all stops the stage with one line. What a manifest may
read (protocols, regular files, size, its root) is mmpipe.data.fetch's trust model.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mmpipe.data import builtin
from mmpipe.data.fetch import FetchError, Policy, check, fetch, is_url, local_path
from mmpipe.errors import PipelineError, redact
from mmpipe.io import BATCH_BYTES, PartWriter, worker_count, write_json_atomic
from mmpipe.modalities import MODALITIES, by_extension, names
from mmpipe.modalities.portable import json_object, printable
from mmpipe.names import DECLARED_FILE

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("digits",)
MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl")
KEY_COLUMNS = ("label", "id", "split", "group")


def file_columns() -> dict[str, str]:
    """Inline modalities (text) may instead name a file in a "<modality>_file" column."""
    return {f"{m}_file": m for m, module in MODALITIES.items() if module.INLINE}


def manifest_columns() -> tuple[str, ...]:
    return (*KEY_COLUMNS, *names(), *file_columns())


def record_columns(params, columns: list[str]) -> dict[str, list[str]]:
    """Record modality (one whose ``record_columns`` hook is set, e.g. tabular) -> the manifest columns gathered
    into its JSON item, under its ``data.<modality>`` params."""
    used, out = set(manifest_columns()), {}
    for m, module in MODALITIES.items():
        if module.record_columns is not None:
            out[m] = module.record_columns(getattr(params, m), columns, used)
            used |= set(out[m])
    return out


def declared(params) -> dict[str, Any]:
    """What collect records in ``DECLARED_FILE`` for clean: each record modality's data params."""
    return {m: getattr(params, m).model_dump(mode="json") for m, module in MODALITIES.items()
            if module.record_columns is not None}


BATCH_ROWS = 512


def raw_schema() -> pa.Schema:
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("group", pa.string()),
        pa.field("condition", pa.string()),
    ]
    for m in names():
        fields += [pa.field(m, pa.binary()), pa.field(f"{m}_ref", pa.string()), pa.field(f"{m}_error", pa.string())]
    return pa.schema(fields)


class Stats:
    """Counts for metrics/collect.json."""

    def __init__(self) -> None:
        self.per_label: Counter[str] = Counter()
        self.present: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.per_label[str(row["label"])] += 1
            for m in names():
                if row.get(m) is not None:
                    self.present[m] += 1
                    self.bytes[m] += len(row[m])
                if row.get(f"{m}_error"):
                    self.errors[m] += 1


# --------------------------------------------------------------------------- built-in corpus


_BANK = None  # the speech bank, handed to each worker process once by its initializer


def _set_bank(bank) -> None:
    global _BANK
    _BANK = bank


def _builtin_rows(indices: list[int], seed: int, cfg) -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        s = builtin.make_sample(i, seed, cfg, _BANK)
        row = {"sample_id": f"digits-{i:07d}", "source_row": i, "label": s.label, "split": None,
               "group": s.group, "condition": s.condition}
        for m in names():
            content = getattr(s, m, None)
            row.update({m: content, f"{m}_ref": None if content is None else "builtin:digits", f"{m}_error": None})
        rows.append(row)
    return rows


def _star_builtin_rows(job) -> list[dict[str, Any]]:
    return _builtin_rows(*job)


def _builtin_batches(params) -> Iterator[list[dict[str, Any]]]:
    cfg = params.builtin
    bank = builtin.speech_bank(params.seed, cfg.tts_variants, cfg.audio_sample_rate)
    jobs = [(list(range(start, min(start + BATCH_ROWS, params.n_samples))), params.seed, cfg)
            for start in range(0, params.n_samples, BATCH_ROWS)]
    workers = worker_count(params.workers)
    if workers == 1 or len(jobs) == 1:
        _set_bank(bank)
        for job in jobs:
            yield _star_builtin_rows(job)
        return
    # spawn, not fork: the parent may hold threads (pyarrow, BLAS) that fork does not copy safely
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_set_bank, initargs=(bank,)) as pool:
        yield from pool.imap(_star_builtin_rows, jobs)


# --------------------------------------------------------------------------- manifests and folders


def policy(params, root: str | None = None) -> Policy:
    """The fetch policy of the data params; ``root``: the source's folder or base URL (used when
    data.confine_to_root is on)."""
    return Policy(max_bytes=int(params.max_file_mb * 1e6), timeout_s=params.fetch_timeout_s,
                  allowed_protocols=tuple(params.allowed_protocols), root=root if params.confine_to_root else None)


def _text(value: Any) -> str | None:
    """A manifest cell as a string, or None when empty (None/NaN/pd.NA/NaT). Numbers read as floats
    only because their column has a null (JSONL, Parquet) are written as the integers they are."""
    if value is None or isinstance(value, (list, tuple, dict, np.ndarray)):
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
    if "label" not in columns:
        raise PipelineError(f"{redact(source)}: manifest has no 'label' column (columns: {', '.join(columns)})")
    records = record_columns(params, columns)
    gathered = {c for record in records.values() for c in record}
    unknown = [c for c in columns if c not in manifest_columns() and c not in gathered]
    if unknown:
        hint = "".join(f" (data.{m}.columns: auto gathers them as {m})" for m in records)
        shown = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20:,} more" if len(unknown) > 20 else "")
        print(f"collect: ignoring manifest columns not used by the pipeline: {shown}{hint}")
    if not gathered and not any(c in columns for c in (*names(), *file_columns())):
        raise PipelineError(f"{redact(source)}: manifest has none of the modality columns {', '.join((*names(), *file_columns()))}")
    return Manifest(columns, n_rows, records, rows)


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
    keyed = {c for c in KEY_COLUMNS if c in manifest.columns}
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
        key = {c: _key_cell(source, i, c, row.get(c)) if c in keyed else None for c in KEY_COLUMNS}
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


def folder_files(root: Path) -> tuple[list[Path], list[str]]:
    """The files of ``<root>/<label>/`` (each label folder read through a symlink too: a link to a
    data folder elsewhere is a label like any other), and what is not one, as paths relative to
    ``root``: files at the top, folders inside a label folder (listed, not descended: no depth, so no
    cycle), hidden folders. FIFOs and dangling links are files here: fetch rejects them, row by row."""
    files, ignored = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            ignored.append(entry.name + ("/" if entry.is_dir() else ""))
        elif not entry.is_dir():  # (is_dir follows a symlink)
            ignored.append(entry.name)
        else:
            for path in sorted(entry.iterdir()):
                if path.is_dir():
                    ignored.append(f"{entry.name}/{path.name}/")
                else:
                    files.append(path)
    return files, ignored


def folder_rows(root: Path) -> list[dict[str, Any]]:
    """``<root>/<label>/<stem>.<ext>``: files sharing a stem are one sample."""
    samples: dict[tuple[str, str], dict[str, list[Path]]] = {}
    files, ignored = folder_files(root)
    for path in files:
        modality = by_extension(path.suffix)
        if modality is None or path.name.startswith("."):
            ignored.append(f"{path.parent.name}/{path.name}")
            continue
        samples.setdefault((path.parent.name, path.stem), {}).setdefault(modality, []).append(path)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        print(f"collect: ignoring {len(ignored)} entries outside <label>/<stem>.<ext> or of unknown type: {shown}")
    if not samples:
        raise PipelineError(f"data.source: folder {root} holds no <label>/<stem>.<ext> files "
                            f"({', '.join(e for m in MODALITIES.values() for e in m.EXTENSIONS)})")
    specs = []
    for i, ((label, stem), files) in enumerate(sorted(samples.items())):
        spec = {"sample_id": f"{label}/{stem}", "source_row": i, "label": label, "split": None, "group": None}
        for m in names():
            found = files.get(m, [])
            if len(found) > 1:
                spec[m] = ("conflict", f"several {m} files share this stem: {', '.join(p.name for p in found)}")
            else:
                spec[m] = ("ref", str(found[0])) if found else None
        specs.append(spec)
    return specs


def _materialize(spec: dict[str, Any], fetch_policy: Policy) -> dict[str, Any]:
    row = {k: spec[k] for k in ("sample_id", "source_row", "label", "split", "group")}
    row["condition"] = None
    for m in names():
        item = spec[m]
        content = ref = error = None
        if item is not None:
            kind, value = item
            if kind == "inline":
                content, ref = value.encode("utf-8", "surrogateescape"), "manifest"
            elif kind == "conflict":
                error = f"conflict: {value}"
            else:
                ref = redact(printable(value))  # stored and shown: credentials out, valid UTF-8
                try:
                    content = fetch(value, fetch_policy)
                except FetchError as exc:
                    error = f"{exc.code}: {exc.reason}"
                except Exception as exc:  # never one file's problem beyond its own row
                    error = f"fetch_error: {redact(type(exc).__name__ + ': ' + str(exc))}"
        row.update({m: content, f"{m}_ref": ref, f"{m}_error": error and printable(error)})
    return row


def _fetched_batches(specs: Iterable[dict[str, Any]], fetch_policy: Policy, threads: int) -> Iterator[list[dict[str, Any]]]:
    """Rows in batches of at most BATCH_ROWS rows and BATCH_BYTES of fetched bytes (a larger row alone; the batch is a
    Parquet row group: what every later stage holds at once), fetched by ``threads`` threads."""
    specs = iter(specs)
    with cf.ThreadPoolExecutor(threads) as pool:
        batch, size = [], 0
        while window := list(itertools.islice(specs, 4 * threads)):
            for row in pool.map(lambda s: _materialize(s, fetch_policy), window):
                row_size = sum(len(row[m]) for m in names() if row.get(m) is not None)
                if batch and (len(batch) >= BATCH_ROWS or size + row_size > BATCH_BYTES):
                    yield batch
                    batch, size = [], 0
                batch.append(row)
                size += row_size
        if batch:
            yield batch


# --------------------------------------------------------------------------- entry point


def describe_source(source: str) -> tuple[str, Any]:
    """('builtin', name) | ('manifest', path-or-url) | ('folder', Path); one-line error otherwise."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise PipelineError(f"data.source: unknown built-in corpus '{source}' "
                                f"(available: {', '.join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA)})")
        return "builtin", name
    if is_url(source) and not source.startswith("file://"):
        return "manifest", source
    if "\x00" in source:
        raise PipelineError("data.source: the path contains a NUL byte")
    path = local_path(source).expanduser()
    if path.is_dir():
        return "folder", path.resolve()
    if path.is_file():
        return "manifest", str(path.resolve())
    raise PipelineError(f"data.source: {source} does not exist (expected builtin:digits, a manifest file or a folder)")


def collect(params, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir/part-*.parquet`` from ``params.source``; return the metrics."""
    started = time.perf_counter()
    kind, where = describe_source(params.source)
    if kind == "builtin":
        total = params.n_samples
        batches: Iterable[list[dict[str, Any]]] = _builtin_batches(params)
    else:
        if kind == "manifest":
            manifest = read_manifest(where, params)
            specs, total = manifest_rows(manifest, where), manifest.n_rows
        else:
            specs = folder_rows(where)
            total = len(specs)
        if total == 0:
            raise PipelineError(f"data.source: {redact(params.source)} holds no samples")
        root = manifest_base(where) if kind == "manifest" else str(where)
        batches = _fetched_batches(specs, policy(params, root), params.fetch_threads)
    schema = raw_schema()
    writer = PartWriter(out_dir, schema, params.rows_per_file)
    stats = Stats()
    with tqdm(total=total, desc="collect", unit="sample", disable=None) as progress:
        for rows in batches:
            stats.add(rows)
            writer.write(pa.Table.from_pylist(rows, schema=schema))
            progress.update(len(rows))
    writer.close()
    if declared(params):
        write_json_atomic(out_dir / DECLARED_FILE, declared(params))
    seconds = time.perf_counter() - started
    return {
        "source": redact(params.source),
        "source_kind": kind,
        "samples": writer.rows,
        "files": writer.files,
        "per_label": dict(sorted(stats.per_label.items())),
        "present": {m: stats.present[m] for m in names()},
        "fetch_errors": {m: stats.errors[m] for m in names()},
        "bytes": {m: stats.bytes[m] for m in names()},
        "seconds": round(seconds, 3),
        "samples_per_s": round(writer.rows / seconds, 1) if seconds > 0 else None,
    }


# --------------------------------------------------------------------------- source fingerprint


def _file_digest(path: Path) -> str:
    """Content digest of a regular file; for anything else (missing, FIFO, device, ...) what it is:
    collect will refuse it, and opening a FIFO here must not block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return "missing" if isinstance(exc, FileNotFoundError) else f"unreadable: {exc.strerror}"
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return "not a regular file"
    with os.fdopen(fd, "rb") as fh:
        try:
            return hashlib.file_digest(fh, "blake2b").hexdigest()[:32]
        except OSError as exc:
            return f"unreadable: {exc.strerror}"


def fingerprint(params) -> dict[str, Any]:
    """What the configured source (``params.source``) currently holds, cheaply: content digests of
    local files, under the same policy as collect (refused references are listed as such).

    The ``source`` stage writes this before every run so that ``collect`` re-runs exactly when
    the user's data changed. Remote (URL) items are fingerprinted by their address only.
    """
    source = redact(params.source)
    kind, where = describe_source(params.source)
    if kind == "builtin":
        return {"source": source, "kind": kind, "generator": builtin.__name__}
    if kind == "folder":
        files, _ = folder_files(where)
        return {"source": source, "kind": kind, "files": {f"{p.parent.name}/{p.name}": _file_digest(p) for p in files}}
    if is_url(where):
        return {"source": source, "kind": kind, "manifest": redact(where)}
    items = {}
    item_policy = policy(params, manifest_base(where))
    for spec in manifest_rows(read_manifest(where, params), where):
        for m in names():
            if spec[m] is not None and spec[m][0] == "ref":
                ref = spec[m][1]
                try:
                    check(ref, item_policy)
                except FetchError as exc:
                    items[redact(printable(ref))] = f"refused: {exc.code}"
                    continue
                local = local_path(ref)
                items[redact(ref)] = "url" if local is None else _file_digest(local)
    return {"source": source, "kind": kind, "manifest_digest": _file_digest(Path(where)), "items": items}
