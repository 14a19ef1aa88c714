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
  never a short file);
- ends every download by ``data.fetch_timeout_s`` after it started, whatever the server does: over
  HTTP(S) a watchdog shuts the connection's sockets at the deadline (a server that drips one byte
  just inside the socket timeout, in the headers or the body, cannot keep a read alive); other
  fsspec protocols are read in a worker thread that is abandoned at the deadline;
- with ``data.confine_to_root``, keeps a manifest to its own root: local paths must resolve (symlinks
  followed) inside the manifest's folder, URLs must lie under the manifest's own base URL, and HTTP
  redirects may not leave it.

Failures raise ``FetchError`` with a code (``not_found``, ``too_large``, ``fetch_error``,
``not_allowed``, ``invalid_ref``) and a one-line reason with credentials redacted.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import os
import posixpath
import re
import socket
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException, IncompleteRead
from pathlib import Path

from mmpipe.errors import redact

CHUNK = 1 << 16
_CHAIN = re.compile(r"::(?![^\[\]]*\])")  # "::" outside [brackets]
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
    parts = links(ref)
    return [part.split("://", 1)[0].lower() if "://" in part else part.lower() if k < len(parts) - 1 else "file"
            for k, part in enumerate(parts)]


def links(ref: str) -> list[str]:
    """The links of a chained fsspec URL ("simplecache::s3://bucket/key", "zip://x::file.zip"); the
    "::" of an IPv6 host ("http://[::1]:8000/x") is not a link separator."""
    return _CHAIN.split(ref)


def is_url(ref: str) -> bool:
    return "://" in ref or len(links(ref)) > 1


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
    if path is not None or len(links(ref)) > 1:
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


def _read_to_end(read, max_bytes: int, where: str, stop: threading.Event | None = None) -> bytes:
    """``read(n)`` until it returns nothing, refusing more than ``max_bytes``; ``stop``: an abandoned
    reader's signal to end at its next read."""
    parts, total = [], 0
    while True:
        chunk = read(CHUNK)
        if not chunk or (stop is not None and stop.is_set()):
            return b"".join(parts)
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(f"more than {max_bytes / 1e6:g} MB", max_bytes, where)
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
        before, after = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        # credentials go neither to another host nor, in clear text, from https down to http
        if new is not None and (after.netloc != before.netloc or (before.scheme, after.scheme) == ("https", "http")):
            new.remove_header("Authorization")
        return new


class Deadline:
    """Shuts every socket it watches at ``timeout_s`` from now: a blocked read returns at once,
    whatever the peer does (``socket.timeout`` bounds one read, not a download)."""

    def __init__(self, timeout_s: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed


def _watched(connection_class, deadline: Deadline):
    """``connection_class`` whose sockets ``deadline`` watches (urllib makes one per redirect hop)."""

    class Watched(connection_class):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


def read_http(url: str, policy: Policy) -> bytes:
    """An HTTP(S) URL read to its end within ``policy.timeout_s``, or a FetchError: never a silently short body."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "mmpipe-collect", "Accept-Encoding": "identity"}
    if parts.username is not None:  # user:password@host: HTTP basic authentication, not part of the address
        token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # [::1]:80 kept as written
    announced = None
    with Deadline(policy.timeout_s) as deadline:
        opener = urllib.request.build_opener(_Redirects(policy), _HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=policy.timeout_s) as response:
                announced = response.headers.get("Content-Length")
                announced = int(announced) if announced and announced.isdigit() else None
                if announced is not None and announced > policy.max_bytes:
                    raise _too_large(announced, policy.max_bytes, url)
                data = _read_to_end(response.read, policy.max_bytes, url)
        except FetchError:
            raise
        except urllib.error.HTTPError as exc:
            code = "not_found" if exc.code in (404, 410) else "fetch_error"
            raise FetchError(code, f"HTTP {exc.code} {exc.reason}: {url}") from None
        except IncompleteRead as exc:
            if deadline.expired:
                raise _timed_out(policy, url) from None
            missing = f" ({exc.expected:,} bytes missing)" if exc.expected else ""
            raise FetchError("fetch_error", f"truncated: the connection closed before the end of the body{missing}: {url}") from None
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
            if deadline.expired:
                raise _timed_out(policy, url) from None
            reason = getattr(exc, "reason", None) or exc
            raise FetchError("fetch_error", f"cannot fetch {url}: {type(exc).__name__}: {reason}") from None
        if deadline.expired:  # the watchdog cut the body short: what arrived is not the file
            raise _timed_out(policy, url, len(data))
    if announced is not None and len(data) != announced:
        raise FetchError("fetch_error", f"truncated: {len(data):,} of {announced:,} bytes (Content-Length) arrived: {url}")
    return data


def _timed_out(policy: Policy, where: str, received: int | None = None) -> FetchError:
    got = f" with {received:,} bytes received" if received is not None else ""
    return FetchError("fetch_error", f"timed out after {policy.timeout_s:g}s (data.fetch_timeout_s){got}: {where}")


def read_fsspec(ref: str, policy: Policy) -> bytes:
    """Any other allowed protocol through fsspec, streamed to the end with the same size limit, in a
    worker thread abandoned at the deadline (fsspec backends offer no common way to cut a read short;
    the abandoned reader stops at its next read)."""
    stop = threading.Event()
    worker = cf.ThreadPoolExecutor(1, thread_name_prefix="fetch")
    try:
        return worker.submit(_read_fsspec, ref, policy, stop).result(timeout=policy.timeout_s)
    except cf.TimeoutError:
        stop.set()
        raise _timed_out(policy, ref) from None
    finally:
        worker.shutdown(wait=False)


def _read_fsspec(ref: str, policy: Policy, stop: threading.Event) -> bytes:
    import fsspec

    try:
        with fsspec.open(ref, "rb") as fh:
            size = getattr(fh, "size", None)
            if isinstance(size, int) and size > policy.max_bytes:
                raise _too_large(size, policy.max_bytes, ref)
            data = _read_to_end(fh.read, policy.max_bytes, ref, stop)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("not_found", f"not found: {ref}") from None
    except Exception as exc:  # fsspec backends raise their own types
        raise FetchError("fetch_error", f"cannot fetch {ref}: {type(exc).__name__}: {exc}") from None
    if isinstance(size, int) and len(data) != size:
        raise FetchError("fetch_error", f"truncated: {len(data):,} of {size:,} bytes arrived: {ref}")
    return data
