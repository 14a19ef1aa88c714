"""Reading one referenced file (a manifest's path or URL) under the manifest trust model.

A manifest is data, and data may come from people you do not fully trust. Every reference goes
through ``fetch``, which:

- accepts only the protocols in ``data.allowed_protocols`` (default ``file``, ``http``, ``https``;
  chained fsspec URLs such as ``simplecache::s3://…`` need every link allowed);
- reads local *regular files* only (no FIFOs, devices or directories; a file whose size changes
  while it is read — e.g. ``/proc/self/environ``, which reports size 0 — is refused), opened without
  blocking;
- streams every protocol to end of file, stopping past ``data.max_file_mb``, and over HTTP compares
  what arrived with the announced ``Content-Length`` (a connection that closes early is an error,
  never a short file), within ``data.fetch_timeout_s`` for the whole download;
- with ``data.confine_to_root``, keeps a manifest to its own root: local paths must resolve (symlinks
  followed) inside the manifest's folder, URLs must lie under the manifest's own base URL, and HTTP
  redirects may not leave it.

Failures raise ``FetchError`` with a code (``not_found``, ``too_large``, ``fetch_error``,
``not_allowed``, ``invalid_ref``) and a one-line reason with credentials redacted.
"""

from __future__ import annotations

import base64
import os
import posixpath
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path

from mmpipe.errors import redact

CHUNK = 1 << 16
MAX_REDIRECTS = 5


class FetchError(OSError):
    """One reference could not be read; ``code`` says how (collect records ``<code>: <reason>``)."""

    def __init__(self, code: str, reason: str):
        super().__init__(redact(reason))
        self.code, self.reason = code, redact(reason)


@dataclass(frozen=True)
class Policy:
    """What a source's references may read (from the data params)."""

    max_bytes: int
    timeout_s: float
    allowed_protocols: tuple[str, ...] = ("file", "http", "https")
    root: str | None = None  # confine_to_root: a local folder or a base URL every reference must lie under


def protocols(ref: str) -> list[str]:
    """The protocols a reference uses: ``file`` for plain paths; every link of a chained fsspec URL."""
    parts = ref.split("::")  # fsspec chaining: "simplecache::s3://bucket/key", "zip://x::file.zip"
    return [part.split("://", 1)[0].lower() if "://" in part else part.lower() if k < len(parts) - 1 else "file"
            for k, part in enumerate(parts)]


def is_url(ref: str) -> bool:
    return "://" in ref or "::" in ref


def local_path(ref: str) -> Path | None:
    """The local path behind a reference (plain path or file:// URL); None for other URLs."""
    if ref.startswith("file://"):
        return Path(urllib.parse.unquote(ref[len("file://"):]))
    return None if is_url(ref) else Path(ref)


def check(ref: str, policy: Policy) -> None:
    """Raise FetchError unless ``ref`` is a well-formed reference this policy lets be read."""
    if "\x00" in ref:
        raise FetchError("invalid_ref", f"reference contains a NUL byte: {ref!r}")
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        raise FetchError("invalid_ref", f"reference is not valid UTF-8: {ref.encode('utf-8', 'surrogateescape')!r}") from None
    refused = [p for p in protocols(ref) if p not in policy.allowed_protocols]
    if refused:
        raise FetchError("not_allowed", f"protocol {refused[0]}:// is not in data.allowed_protocols "
                         f"({', '.join(policy.allowed_protocols)}): {ref}")
    if policy.root is not None and not within_root(ref, policy.root):
        raise FetchError("not_allowed", f"outside the manifest's root {policy.root} (data.confine_to_root): {ref}")


def within_root(ref: str, root: str) -> bool:
    """Does ``ref`` lie under ``root`` (a folder: after resolving symlinks and '..'; a URL: under it)?"""
    path = local_path(ref)
    if not is_url(root):
        if path is None:
            return False  # a local manifest confined to its folder reads no URLs
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    if path is not None or "::" in ref:
        return False
    target, base = urllib.parse.urlsplit(ref), urllib.parse.urlsplit(root.rstrip("/") + "/")
    # dot segments resolved as a server would: '/data/../secret' is not under '/data/'
    target_path = posixpath.normpath(urllib.parse.unquote(target.path) or "/")
    return (target.scheme, target.hostname, target.port) == (base.scheme, base.hostname, base.port) and \
        (target_path + "/").startswith(urllib.parse.unquote(base.path))


def fetch(ref: str, policy: Policy) -> bytes:
    """The bytes of one reference, under ``policy``; FetchError otherwise."""
    check(ref, policy)
    path = local_path(ref)
    if path is not None:
        return read_local(path, policy.max_bytes)
    if protocols(ref) in (["http"], ["https"]):
        return read_http(ref, policy)
    return read_fsspec(ref, policy)


def _too_large(size: int | str, max_bytes: int, where: str) -> FetchError:
    size_text = f"{size / 1e6:.1f} MB" if isinstance(size, int) else size
    return FetchError("too_large", f"file is {size_text} > data.max_file_mb ({max_bytes / 1e6:g} MB): {where}")


def read_local(path: Path, max_bytes: int) -> bytes:
    """A local regular file of at most ``max_bytes``, read to its end."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FetchError("not_found", f"file not found: {path}") from None
    except OSError as exc:
        raise FetchError("fetch_error", f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "a socket"
            raise FetchError("fetch_error", f"not a regular file ({kind}): {path}")
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes, str(path))
        data = _read_to_end(lambda n: os.read(fd, n), max_bytes, str(path))
    except OSError as exc:
        if isinstance(exc, FetchError):
            raise
        raise FetchError("fetch_error", f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise FetchError("fetch_error", f"file size changed while reading ({info.st_size:,} bytes announced, "
                         f"{len(data):,} read): a pseudo-file or a file being written: {path}")
    return data


def _read_to_end(read, max_bytes: int, where: str, deadline: float | None = None, timeout_s: float = 0.0) -> bytes:
    parts, total = [], 0
    while True:
        chunk = read(CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"more than {max_bytes / 1e6:g} MB", max_bytes, where)
        if deadline is not None and time.monotonic() > deadline:
            raise FetchError("fetch_error", f"timed out after {timeout_s:g}s (data.fetch_timeout_s) with "
                             f"{total:,} bytes received: {where}")
        parts.append(chunk)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS redirects, each checked against the policy; credentials are not
    forwarded to another host."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        try:
            check(newurl, self.policy)
        except FetchError as exc:
            raise FetchError(exc.code, f"redirected ({code}) to a refused location: {exc.reason}") from None
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def read_http(url: str, policy: Policy) -> bytes:
    """An HTTP(S) URL read to its end, or a FetchError: never a silently short body."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "mmpipe-collect", "Accept-Encoding": "identity"}
    if parts.username is not None:  # user:password@host: HTTP basic authentication, not part of the address
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urllib.parse.urlunsplit(parts._replace(netloc=host))
    opener = urllib.request.build_opener(_Redirects(policy))
    deadline = time.monotonic() + policy.timeout_s
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=policy.timeout_s) as response:
            announced = response.headers.get("Content-Length")
            announced = int(announced) if announced and announced.isdigit() else None
            if announced is not None and announced > policy.max_bytes:
                raise _too_large(announced, policy.max_bytes, url)
            data = _read_to_end(response.read, policy.max_bytes, url, deadline, policy.timeout_s)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        code = "not_found" if exc.code in (404, 410) else "fetch_error"
        raise FetchError(code, f"HTTP {exc.code} {exc.reason}: {url}") from None
    except IncompleteRead as exc:
        missing = f" ({exc.expected:,} bytes missing)" if exc.expected else ""
        raise FetchError("fetch_error", f"truncated: the connection closed before the end of the body{missing}: {url}") from None
    except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError("fetch_error", f"cannot fetch {url}: {type(exc).__name__}: {reason}") from None
    if announced is not None and len(data) != announced:
        raise FetchError("fetch_error", f"truncated: {len(data):,} of {announced:,} bytes (Content-Length) arrived: {url}")
    return data


def read_fsspec(ref: str, policy: Policy) -> bytes:
    """Any other allowed protocol through fsspec, streamed to the end with the same size limit."""
    import fsspec

    try:
        with fsspec.open(ref, "rb") as fh:
            size = getattr(fh, "size", None)
            if isinstance(size, int) and size > policy.max_bytes:
                raise _too_large(size, policy.max_bytes, ref)
            data = _read_to_end(fh.read, policy.max_bytes, ref, time.monotonic() + policy.timeout_s, policy.timeout_s)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("not_found", f"not found: {ref}") from None
    except Exception as exc:  # fsspec backends raise their own types
        raise FetchError("fetch_error", f"cannot fetch {ref}: {type(exc).__name__}: {exc}") from None
    if isinstance(size, int) and len(data) != size:
        raise FetchError("fetch_error", f"truncated: {len(data):,} of {size:,} bytes arrived: {ref}")
    return data
