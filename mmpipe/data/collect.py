"""collect: turn a source (built-in corpus, manifest or folder) into raw Parquet files.

Output: a few ``part-NNNNN.parquet`` files holding metadata and the raw encoded bytes of every
modality. Nothing is validated here beyond the source's structure: an item that cannot be
fetched is recorded with its error (``<modality>_error``) so that ``clean`` lists it in the
rejects; a source that cannot be read at all stops the stage with one line. What a manifest may
read (protocols, regular files, size, its root) is mmpipe.data.fetch's trust model.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
from tqdm import tqdm

from mmpipe.data import builtin
from mmpipe.data.fetch import FetchError, Policy, fetch
from mmpipe.data.manifest import manifest_base, manifest_rows, policy, read_manifest
from mmpipe.data.source import describe_source, folder_files
from mmpipe.errors import PipelineError, redact
from mmpipe.io import BATCH_BYTES, PartWriter, worker_count, write_json_atomic
from mmpipe.modalities import MODALITIES, by_extension, names
from mmpipe.modalities.portable import printable
from mmpipe.names import DECLARED_FILE

def declared(params) -> dict[str, Any]:
    """What collect records in ``DECLARED_FILE`` for clean: the target (data.target) and each record
    modality's data params."""
    return {"target": params.target.model_dump(mode="json")} | {
        m: getattr(params, m).model_dump(mode="json") for m, module in MODALITIES.items()
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

    def __init__(self, count_labels: bool = True) -> None:
        self.count_labels = count_labels  # classes: a few values; numbers and tag sets: as many as rows
        self.per_label: Counter[str] = Counter()
        self.present: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if self.count_labels:
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


def _builtin_rows(indices: list[int], seed: int, cfg, target: str = "category") -> list[dict[str, Any]]:
    rows = []
    for i in indices:
        s = builtin.make_sample(i, seed, cfg, _BANK)
        row = {"sample_id": f"digits-{i:07d}", "source_row": i, "label": builtin.target_cell(s.label, target),
               "split": None,
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
    jobs = [(list(range(start, min(start + BATCH_ROWS, params.n_samples))), params.seed, cfg, params.target.type)
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
            if params.target.type != "category":
                raise PipelineError(f"data.target.type {params.target.type}: a folder's layout gives one class per "
                                    "sample (its folder name); use a manifest with a target column")
            specs = folder_rows(where)
            total = len(specs)
        if total == 0:
            raise PipelineError(f"data.source: {redact(params.source)} holds no samples")
        root = manifest_base(where) if kind == "manifest" else str(where)
        batches = _fetched_batches(specs, policy(params, root), params.fetch_threads)
    schema = raw_schema()
    writer = PartWriter(out_dir, schema, params.rows_per_file)
    stats = Stats(count_labels=params.target.type == "category")
    with tqdm(total=total, desc="collect", unit="sample", disable=None) as progress:
        for rows in batches:
            stats.add(rows)
            writer.write(pa.Table.from_pylist(rows, schema=schema))
            progress.update(len(rows))
    writer.close()
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


