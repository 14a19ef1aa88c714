"""Output helpers: atomic writes (a killed stage leaves nothing half-written, and what it left aside
is removed by the next run), Parquet part files
and row-group reading (memory bounded by a row group), nested-dict flattening."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 1024  # rows per Parquet row group: the unit every stage streams by


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, /proc/<pid>/stat field 22); None when no
    such process. With the pid it names one process, also where pids are reused from run to run (a
    container's stage is often pid 7 every time)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    """Process ``pid`` runs (and, given ``start``, is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return start is None or process_start(pid) in (start, None)


def owner_tag() -> str:
    """``<pid>@<start>``: what a temporary's name says of the process that writes it."""
    return f"{os.getpid()}@{process_start(os.getpid()) or 0}"


# ".<name>.tmp-<pid>@<start>-…" / ".<name>.old-<pid>@<start>" (earlier: without @<start>)
_OWNER = r"(?:(?P<pid>\d+)(?:@(?P<start>\d+))?(?:-.*)?|.*)"


def _stale(match: re.Match) -> bool:
    if not match["pid"]:
        return True
    return not process_alive(int(match["pid"]), int(match["start"]) if match["start"] and match["start"] != "0" else None)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove what writers of ``final`` killed mid-way left next to it — ``.<name>.tmp-<pid>@<start>-*``
    and ``.<name>.old-<pid>@<start>`` whose process is gone, or whose pid now belongs to a process
    that started at another time (a live writer's are kept) — and say so."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-{_OWNER}")
    removed = []
    for path in sorted(final.parent.glob(f".{glob.escape(final.name)}.*")):
        match = pattern.fullmatch(path.name)
        if match is None or not _stale(match):
            continue
        _remove(path)
        removed.append(path)
    return removed


def remove_stale_temporaries_in(folder: Path) -> list[Path]:
    """``remove_stale_temporaries`` for every entry of ``folder``, at any depth (a folder of files
    each written atomically: DVCLive's)."""
    pattern = re.compile(rf"\.(?P<name>.+?)\.(?:tmp|old)-{_OWNER}")
    removed = []
    for path in sorted(Path(folder).rglob(".*")) if Path(folder).is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match is not None and path.exists() and _stale(match):
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    print(f"removed {path}: left behind by a run that was killed")


@contextlib.contextmanager
def scratch(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside output ``final`` that is also the process's temporary folder
    (``tempfile.tempdir``: what ONNX Runtime's quantizer and every TemporaryDirectory use) while the
    block runs; removed after it. A stage killed with -9 leaves it beside its output, where the next
    run's ``remove_stale_temporaries`` finds it — not in the system's temporary folder for ever."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner_tag()}-scratch-", dir=final.parent))
    previous, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename. Temporary
    siblings of killed earlier runs are removed first."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner_tag()}-", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{owner_tag()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-{owner_tag()}-", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def flatten(obj: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Flatten nested dicts into ``{"a.b.c": leaf}`` (lists are kept as leaves)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            out.update(flatten(value, name, sep))
    else:
        out[prefix] = obj
    return out


def iter_row_groups(path: str | os.PathLike, columns: list[str] | None = None):
    """Yield a Parquet file's row groups as tables, one at a time.

    Reads row group by row group on purpose: ``ParquetFile.iter_batches`` keeps earlier
    column chunks of binary columns alive (measured: memory grew with the file size).
    """
    reader = pq.ParquetFile(path)
    for i in range(reader.metadata.num_row_groups):
        yield reader.read_row_group(i, columns=columns)


BATCH_BYTES = 64 * 2**20  # at most this many bytes of media per batch a stage holds (photos, long recordings)


def bounded_slices(table: pa.Table, max_rows: int, max_bytes: int = BATCH_BYTES) -> Iterator[pa.Table]:
    """``table`` in consecutive slices of at most ``max_rows`` rows and ``max_bytes`` bytes of its binary
    columns (at least one row each): with large media, a batch's memory is bounded by bytes, not rows."""
    binary = [name for name, type_ in zip(table.column_names, table.schema.types) if pa.types.is_binary(type_)]
    sizes = np.zeros(table.num_rows, np.int64)
    for name in binary:
        sizes += pc.fill_null(pc.binary_length(table.column(name)), 0).to_numpy(zero_copy_only=False)
    start = 0
    while start < table.num_rows:
        cumulative = np.cumsum(sizes[start:start + max_rows])
        take = max(1, int(np.searchsorted(cumulative, max_bytes, side="right")))
        yield table.slice(start, take)
        start += take


def worker_count(requested: int) -> int:
    return requested or os.cpu_count() or 1


class PartWriter:
    """Streams rows into ``part-NNNNN.parquet`` files of at most ``rows_per_file`` rows."""

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_file: int):
        self.out_dir, self.schema, self.rows_per_file = out_dir, schema, rows_per_file
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.files = 0
        self.rows = 0
        binary = [f.name for f in schema if pa.types.is_binary(f.type)]
        # Encoded media do not compress; strings and ids do.
        self._compression = {f.name: ("none" if f.name in binary else "zstd") for f in schema}
        self._dictionary = [f.name for f in schema if f.name not in binary]

    def _open(self) -> None:
        path = self.out_dir / f"part-{self.files:05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema, compression=self._compression,
                                        use_dictionary=self._dictionary)
        self.files += 1
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self.close()
                self._open()
            take = min(self.rows_per_file - self._rows_in_file, table.num_rows - start)
            self._writer.write_table(table.slice(start, take), row_group_size=ROW_GROUP_ROWS)
            self._rows_in_file += take
            self.rows += take
            start += take

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
