"""The source of the data (``data.source``): which kind it is, and a cheap fingerprint of what it holds.

The ``source`` stage runs on every ``dvc repro`` and writes the fingerprint, so that ``collect`` re-runs
exactly when the user's data changed: this module imports little (a manifest's reader only for a
manifest), because that stage's start-up is most of what an unchanged pipeline costs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from mmpipe.data.fetch import FetchError, check, is_url, local_path
from mmpipe.errors import PipelineError, redact
from mmpipe.modalities import names
from mmpipe.modalities.portable import printable

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("digits",)

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
        return {"source": source, "kind": kind, "generator": "mmpipe.data.builtin"}
    if kind == "folder":
        files, _ = folder_files(where)
        return {"source": source, "kind": kind, "files": {f"{p.parent.name}/{p.name}": _file_digest(p) for p in files}}
    if is_url(where):
        return {"source": source, "kind": kind, "manifest": redact(where)}
    from mmpipe.data.manifest import manifest_base, manifest_rows, policy, read_manifest

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
