"""collect: turn a source (built-in corpus, manifest or folder) into raw Parquet files.

Output: a few ``part-NNNNN.parquet`` files holding metadata and the raw encoded bytes of every
modality. Nothing is validated here beyond the source's structure: an item that cannot be
fetched is recorded with its error (``<modality>_error``) so that ``clean`` lists it in the
rejects; a source that cannot be read at all stops the stage with one line.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin

import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from mmpipe.data import builtin
from mmpipe.errors import PipelineError
from mmpipe.io import PartWriter, worker_count
from mmpipe.modalities import MODALITIES, NAMES, by_extension

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("digits",)
MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl")
# Inline modalities (text) may instead name a file in a "<modality>_file" column.
FILE_COLUMNS = {f"{m}_file": m for m, module in MODALITIES.items() if module.INLINE}
MANIFEST_COLUMNS = ("label", "id", "split", "group", *NAMES, *FILE_COLUMNS)
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
    for m in NAMES:
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
            for m in NAMES:
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
        for m in NAMES:
            content = getattr(s, m)
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


def _is_url(ref: str) -> bool:
    return "://" in ref


def _local_path(ref: str) -> Path | None:
    """The local path behind a reference (plain path or file:// URL); None for remote URLs."""
    if ref.startswith("file://"):
        return Path(ref[len("file://"):])
    return None if _is_url(ref) else Path(ref)


class FileTooLarge(OSError):
    """A referenced file is over data.max_file_mb."""


def fetch(ref: str, timeout_s: float, max_bytes: int) -> bytes:
    """Read one referenced file (local path or fsspec URL); raise OSError with a short reason."""
    path = _local_path(ref)
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"file not found: {path}")
        if not path.is_file():
            raise IsADirectoryError(f"not a file: {path}")
        size = path.stat().st_size
        if size > max_bytes:
            raise FileTooLarge(f"file is {size / 1e6:.1f} MB > data.max_file_mb ({max_bytes / 1e6:g} MB): {path}")
        return path.read_bytes()
    import fsspec

    kwargs: dict[str, Any] = {}
    if ref.startswith(("http://", "https://")):
        import aiohttp

        kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
    try:
        with fsspec.open(ref, "rb", **kwargs) as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"not found: {ref}") from None
    except Exception as exc:  # fsspec backends raise their own types
        raise OSError(f"cannot fetch {ref}: {type(exc).__name__}: {exc}") from None
    if len(data) > max_bytes:
        raise FileTooLarge(f"file is larger than data.max_file_mb ({max_bytes / 1e6:g} MB): {ref}")
    return data


def _text(value: Any) -> str | None:
    """A manifest cell as a string, or None when empty (NaN/None)."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:
        return None
    value = str(value)
    return value


def read_manifest(source: str) -> pd.DataFrame:
    """Read a .csv/.parquet/.jsonl manifest (local or fsspec URL) with every cell as a string."""
    suffix = Path(source.split("?")[0]).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise PipelineError(f"{source}: unsupported manifest type '{suffix}' (expected {', '.join(MANIFEST_SUFFIXES)})")
    import fsspec

    try:
        with fsspec.open(source, "rb") as fh:
            if suffix == ".csv":
                # An empty CSV cell means "absent"; any other text is kept verbatim (labels with spaces
                # too). Invalid UTF-8 is carried as surrogates so that clean can reject that one cell.
                frame = pd.read_csv(fh, dtype=object, keep_default_na=False, na_values=[""],
                                    encoding="utf-8", encoding_errors="surrogateescape")
            elif suffix == ".parquet":
                frame = pd.read_parquet(fh)
            else:
                frame = pd.read_json(fh, lines=True, dtype=False)
    except FileNotFoundError:
        raise PipelineError(f"data.source: {source} does not exist") from None
    except Exception as exc:
        raise PipelineError(f"{source}: cannot read manifest: {str(exc).splitlines()[0]}") from None
    if "label" not in frame.columns:
        raise PipelineError(f"{source}: manifest has no 'label' column (columns: {', '.join(map(str, frame.columns))})")
    unknown = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    if unknown:
        print(f"collect: ignoring manifest columns not used by the pipeline: {', '.join(map(str, unknown))}")
    if not any(c in frame.columns for c in (*NAMES, *FILE_COLUMNS)):
        raise PipelineError(f"{source}: manifest has none of the modality columns {', '.join((*NAMES, *FILE_COLUMNS))}")
    return frame


def _resolve(ref: str, base: str) -> str:
    if _is_url(ref):
        return ref
    if _is_url(base):
        return urljoin(base.rstrip("/") + "/", ref)
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else (Path(base) / path).resolve())


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
            raise PipelineError(f"{source}: row {row}: column '{column}' is not valid UTF-8") from None
    return text


def manifest_rows(source: str) -> list[dict[str, Any]]:
    """One row spec per manifest row: refs resolved, inline content kept, ids given or derived."""
    frame = read_manifest(source)
    base = source.rsplit("/", 1)[0] if _is_url(source) else str(Path(source).resolve().parent)
    specs = []
    columns = {c: frame[c].tolist() for c in frame.columns if c in MANIFEST_COLUMNS}

    def cell(column: str, i: int) -> str | None:
        return _text(columns[column][i]) if column in columns else None

    for i in range(len(frame)):
        cells = {m: cell(m, i) for m in NAMES}
        files = {m: cell(c, i) for c, m in FILE_COLUMNS.items()}
        label = _key_cell(source, i, "label", columns["label"][i])
        given_id = _key_cell(source, i, "id", columns["id"][i]) if "id" in columns else None
        spec = {
            "sample_id": given_id if given_id is not None else _derived_id(label, [*cells.values(), *files.values()]),
            "source_row": i,
            "label": label,
            "split": _key_cell(source, i, "split", columns["split"][i]) if "split" in columns else None,
            "group": _key_cell(source, i, "group", columns["group"][i]) if "group" in columns else None,
        }
        for m, module in MODALITIES.items():
            value, file = cells[m], files.get(m)
            if value is not None and file is not None:
                spec[m] = ("conflict", f"both '{m}' and '{m}_file' are set on this row")
            elif file is not None:
                spec[m] = ("ref", _resolve(file, base))
            elif value is None:
                spec[m] = None
            elif module.INLINE:
                spec[m] = ("inline", value)
            else:
                spec[m] = ("ref", _resolve(value, base))
        specs.append(spec)
    return specs


def folder_rows(root: Path) -> list[dict[str, Any]]:
    """``<root>/<label>/<stem>.<ext>``: files sharing a stem are one sample."""
    samples: dict[tuple[str, str], dict[str, list[Path]]] = {}
    ignored = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        modality = by_extension(path.suffix)
        if len(rel.parts) != 2 or modality is None or path.name.startswith("."):
            ignored.append(str(rel))
            continue
        samples.setdefault((rel.parts[0], path.stem), {}).setdefault(modality, []).append(path)
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        print(f"collect: ignoring {len(ignored)} file(s) outside <label>/<stem>.<ext> or of unknown type: {shown}")
    if not samples:
        raise PipelineError(f"data.source: folder {root} holds no <label>/<stem>.<ext> files "
                            f"({', '.join(e for m in MODALITIES.values() for e in m.EXTENSIONS)})")
    specs = []
    for i, ((label, stem), files) in enumerate(sorted(samples.items())):
        spec = {"sample_id": f"{label}/{stem}", "source_row": i, "label": label, "split": None, "group": None}
        for m in NAMES:
            found = files.get(m, [])
            if len(found) > 1:
                spec[m] = ("conflict", f"several {m} files share this stem: {', '.join(p.name for p in found)}")
            else:
                spec[m] = ("ref", str(found[0])) if found else None
        specs.append(spec)
    return specs


def _materialize(spec: dict[str, Any], timeout_s: float, max_bytes: int) -> dict[str, Any]:
    row = {k: spec[k] for k in ("sample_id", "source_row", "label", "split", "group")}
    row["condition"] = None
    for m in NAMES:
        item = spec[m]
        content = ref = error = None
        if item is not None:
            kind, value = item
            if kind == "inline":
                content, ref = value.encode("utf-8", "surrogateescape"), "manifest"
            elif kind == "conflict":
                error = f"conflict: {value}"
            else:
                ref = value
                try:
                    content = fetch(value, timeout_s, max_bytes)
                except FileNotFoundError as exc:
                    error = f"not_found: {exc}"
                except FileTooLarge as exc:
                    error = f"too_large: {exc}"
                except OSError as exc:
                    error = f"fetch_error: {exc}"
        row.update({m: content, f"{m}_ref": ref, f"{m}_error": error})
    return row


def _fetched_batches(specs: list[dict[str, Any]], params) -> Iterator[list[dict[str, Any]]]:
    max_bytes = int(params.max_file_mb * 1e6)
    with cf.ThreadPoolExecutor(params.fetch_threads) as pool:
        for start in range(0, len(specs), BATCH_ROWS):
            batch = specs[start:start + BATCH_ROWS]
            yield list(pool.map(lambda s: _materialize(s, params.fetch_timeout_s, max_bytes), batch))


# --------------------------------------------------------------------------- entry point


def describe_source(source: str) -> tuple[str, Any]:
    """('builtin', name) | ('manifest', path-or-url) | ('folder', Path); one-line error otherwise."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_CORPORA:
            raise PipelineError(f"data.source: unknown built-in corpus '{source}' "
                                f"(available: {', '.join(BUILTIN_PREFIX + c for c in BUILTIN_CORPORA)})")
        return "builtin", name
    if _is_url(source) and not source.startswith("file://"):
        return "manifest", source
    path = _local_path(source).expanduser()
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
        specs = manifest_rows(where) if kind == "manifest" else folder_rows(where)
        total = len(specs)
        if total == 0:
            raise PipelineError(f"data.source: {params.source} holds no samples")
        batches = _fetched_batches(specs, params)
    schema = raw_schema()
    writer = PartWriter(out_dir, schema, params.rows_per_file)
    stats = Stats()
    with tqdm(total=total, desc="collect", unit="sample", disable=None) as progress:
        for rows in batches:
            stats.add(rows)
            writer.write(pa.Table.from_pylist(rows, schema=schema))
            progress.update(len(rows))
    writer.close()
    seconds = time.perf_counter() - started
    return {
        "source": params.source,
        "source_kind": kind,
        "samples": writer.rows,
        "files": writer.files,
        "per_label": dict(sorted(stats.per_label.items())),
        "present": {m: stats.present[m] for m in NAMES},
        "fetch_errors": {m: stats.errors[m] for m in NAMES},
        "bytes": {m: stats.bytes[m] for m in NAMES},
        "seconds": round(seconds, 3),
        "samples_per_s": round(writer.rows / seconds, 1) if seconds > 0 else None,
    }


# --------------------------------------------------------------------------- source fingerprint


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "blake2b").hexdigest()[:32]


def fingerprint(source: str) -> dict[str, Any]:
    """What the configured source currently holds, cheaply: content digests of local files.

    The ``source`` stage writes this before every run so that ``collect`` re-runs exactly when
    the user's data changed. Remote (URL) items are fingerprinted by their address only.
    """
    kind, where = describe_source(source)
    if kind == "builtin":
        return {"source": source, "kind": kind, "generator": builtin.__name__}
    if kind == "folder":
        files = sorted(p for p in where.rglob("*") if p.is_file())
        return {"source": source, "kind": kind,
                "files": {str(p.relative_to(where)): _file_digest(p) for p in files}}
    if _is_url(where):
        return {"source": source, "kind": kind, "manifest": where}
    items = {}
    for spec in manifest_rows(where):
        for m in NAMES:
            if spec[m] is not None and spec[m][0] == "ref":
                ref = spec[m][1]
                local = _local_path(ref)
                items[ref] = "url" if local is None else _file_digest(local) if local.is_file() else "missing"
    return {"source": source, "kind": kind, "manifest_digest": _file_digest(Path(where)), "items": items}
