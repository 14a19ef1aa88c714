"""collect's reads under the manifest trust model: real HTTP servers on loopback that misbehave
(no Content-Length, chunked, slow drip, early close, redirects), pseudo-files, FIFOs, devices,
symlinks and paths out of the manifest's root, protocols not allowed, credentials in URLs."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, tone, wav_bytes
from mmpipe.data import collect
from mmpipe.data.fetch import FetchError, Policy, fetch, within_root
from mmpipe.errors import redact

PAYLOAD = wav_bytes(tone(seconds=131.0, rate=16000))  # a real 4 MiB WAV: a truncated copy would still decode


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD in the ways real servers do, and in the ways broken ones do."""

    protocol_version = "HTTP/1.1"
    seen_headers: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def _start(self, status: int = 200, **headers) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), str(value))
        self.end_headers()

    def _pieces(self, data: bytes, size: int, pause: float = 0.0):
        for start in range(0, len(data), size):
            yield data[start:start + size]
            if pause:
                time.sleep(pause)

    def do_GET(self) -> None:  # noqa: C901 (one branch per behaviour)
        Misbehaving.seen_headers.append(dict(self.headers))
        route = self.path.split("?")[0]
        if route == "/plain.wav":
            self._start(Content_Length=len(PAYLOAD))
            self.wfile.write(PAYLOAD)
        elif route == "/close-delimited.wav":  # no Content-Length, no chunking: the body ends at close
            self._start(Connection="close")
            for piece in self._pieces(PAYLOAD, 1 << 16):
                self.wfile.write(piece)
            self.close_connection = True
        elif route in ("/chunked.wav", "/chunked-cut.wav"):
            self._start(Transfer_Encoding="chunked")
            pieces = list(self._pieces(PAYLOAD, 1 << 16))
            for piece in pieces[: len(pieces) // 2] if route == "/chunked-cut.wav" else pieces:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            if route == "/chunked.wav":
                self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True
        elif route == "/drip.wav":  # slow but within the time limit
            self._start(Content_Length=len(PAYLOAD))
            for piece in self._pieces(PAYLOAD, 1 << 18, pause=0.02):
                self.wfile.write(piece)
                self.wfile.flush()
        elif route == "/too-slow.wav":  # each piece inside the socket timeout, the whole beyond the limit
            self._start(Content_Length=len(PAYLOAD))
            with contextlib.suppress(OSError):
                for piece in self._pieces(PAYLOAD, 1 << 18, pause=0.3):
                    self.wfile.write(piece)
                    self.wfile.flush()
        elif route == "/drip-body.wav":  # one byte every 0.25 s: every read inside the socket timeout, for 10 s
            self._start(Content_Length=40)
            with contextlib.suppress(OSError):
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
        elif route == "/drip-headers.wav":  # the same, in the headers: the response never starts
            with contextlib.suppress(OSError):
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 38 + b"\r\nContent-Length: 0\r\n\r\n":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.25)
            self.close_connection = True
        elif route == "/manifest.csv":
            body = b"label,text\nx,seven\ny,eight\n"
            self._start(Content_Length=len(body))
            self.wfile.write(body)
        elif route == "/liar.wav":  # announces the whole file, sends half, closes
            self._start(Content_Length=len(PAYLOAD))
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.close_connection = True
        elif route == "/huge-no-length.bin":  # endless body without Content-Length
            self._start(Connection="close")
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(b"\0" * (1 << 16))
        elif route == "/to-plain":
            self._start(302, Location="/plain.wav", Content_Length=0)
        elif route == "/to-secret":
            self._start(302, Location="/secret/key.wav", Content_Length=0)
        elif route == "/to-elsewhere":
            self._start(302, Location=f"http://localhost:{self.server.server_address[1]}/plain.wav", Content_Length=0)
        else:
            self._start(404, Content_Length=0)


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # clients that give up (too large, too slow) reset the connection: expected here


class V6Server(QuietServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Misbehaving)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


POLICY = Policy(max_bytes=8_000_000, timeout_s=5.0)


@pytest.mark.parametrize("route", ["plain.wav", "close-delimited.wav", "chunked.wav", "drip.wav", "to-plain"])
def test_every_way_of_sending_a_whole_body_gives_the_whole_file(server, route):
    assert fetch(f"{server}/{route}", POLICY) == PAYLOAD


@pytest.mark.parametrize("route,policy,reason", [
    ("liar.wav", POLICY, "truncated: 2,096,022 of 4,192,044 bytes (Content-Length) arrived"),
    ("chunked-cut.wav", POLICY, "truncated: the connection closed before the end of the body"),
    ("too-slow.wav", Policy(max_bytes=8_000_000, timeout_s=1.0), "timed out after 1s (data.fetch_timeout_s)"),
    ("huge-no-length.bin", Policy(max_bytes=1_000_000, timeout_s=5.0), "file is more than 1 MB > data.max_file_mb"),
    ("plain.wav", Policy(max_bytes=1_000_000, timeout_s=5.0), "file is 4.2 MB > data.max_file_mb (1 MB)"),
    ("nothing-here.wav", POLICY, "HTTP 404"),
])
def test_a_body_that_does_not_arrive_whole_is_an_error_never_a_short_file(server, route, policy, reason):
    with pytest.raises(FetchError) as info:
        fetch(f"{server}/{route}", policy)
    assert reason in info.value.reason and "\n" not in info.value.reason


def test_collect_over_misbehaving_servers_stores_whole_files_or_rejects(server, tmp_path, data_params):
    routes = ["plain.wav", "close-delimited.wav", "chunked.wav", "drip.wav", "liar.wav", "chunked-cut.wav"]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"] * len(routes), "audio": [f"{server}/{r}" for r in routes]}).to_csv(manifest, index=False)
    out = tmp_path / "raw"
    out.mkdir()
    metrics = collect.collect(data_params(source=str(manifest), max_file_mb=8), out)
    raw = pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()
    for route, row in zip(routes, raw):
        if route in ("liar.wav", "chunked-cut.wav"):
            assert row["audio"] is None and row["audio_error"].startswith("fetch_error: truncated"), route
        else:
            assert row["audio"] == PAYLOAD, route
    assert metrics["fetch_errors"]["audio"] == 2


@pytest.mark.parametrize("route", ["drip-body.wav", "drip-headers.wav"])
def test_a_dripping_server_cannot_keep_a_download_past_its_deadline(server, route):
    """One byte every 0.25 s keeps every read inside a 1 s socket timeout: the download (headers
    included) must still end at data.fetch_timeout_s, not when the server is done (10 s)."""
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch(f"{server}/{route}", Policy(max_bytes=8_000_000, timeout_s=1.0))
    assert time.monotonic() - started < 2.0
    assert "timed out after 1s (data.fetch_timeout_s)" in info.value.reason


def test_collect_over_eight_dripping_urls_ends_by_the_deadline(server, tmp_path, data_params):
    manifest = tmp_path / "m.csv"
    routes = ["drip-body.wav", "drip-headers.wav"] * 4 + ["plain.wav"]
    pd.DataFrame({"label": ["x"] * len(routes), "audio": [f"{server}/{r}" for r in routes]}).to_csv(manifest, index=False)
    (tmp_path / "raw").mkdir()
    started = time.monotonic()
    metrics = collect.collect(data_params(source=str(manifest), max_file_mb=8, fetch_timeout_s=1, fetch_threads=8),
                              tmp_path / "raw")
    assert time.monotonic() - started < 5.0
    raw = pq.read_table(next((tmp_path / "raw").glob("part-*.parquet"))).to_pylist()
    assert [row["audio_error"].split(" (")[0] for row in raw[:8]] == ["fetch_error: timed out after 1s"] * 8
    assert raw[8]["audio"] == PAYLOAD and metrics["fetch_errors"]["audio"] == 8


def test_credentials_stay_off_a_downgrade_to_http_and_keep_an_ipv6_host(server):
    from mmpipe.data.fetch import _Redirects

    handler = _Redirects(POLICY)
    secure = urllib.request.Request("https://example.org/a.wav", headers={"Authorization": "Basic eDp5"})
    same_host_http = handler.redirect_request(secure, None, 302, "Found", {}, "http://example.org/a.wav")
    same_host_https = handler.redirect_request(secure, None, 302, "Found", {}, "https://example.org/b.wav")
    assert not same_host_http.has_header("Authorization")  # would travel in clear text
    assert same_host_https.has_header("Authorization")
    # user:pass@[::1]: the address is rebuilt without the credentials, brackets kept
    httpd = V6Server(("::1", 0), Misbehaving)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        Misbehaving.seen_headers.clear()
        assert fetch(f"http://alice:s3cret@[::1]:{httpd.server_address[1]}/plain.wav", POLICY) == PAYLOAD
        assert Misbehaving.seen_headers[-1]["Authorization"] == "Basic YWxpY2U6czNjcmV0"
    finally:
        httpd.shutdown()


def test_redirects_are_checked_and_do_not_carry_credentials_elsewhere(server, tmp_path):
    confined = Policy(max_bytes=8_000_000, timeout_s=5.0, root=f"{server}/public")
    with pytest.raises(FetchError) as info:
        fetch(f"{server}/public/../to-secret", confined)
    assert info.value.code == "not_allowed"
    Misbehaving.seen_headers.clear()
    host, port = server.split("//")[1].split(":")
    data = fetch(f"http://alice:s3cret@{host}:{port}/to-elsewhere", POLICY)
    assert data == PAYLOAD
    first, second = Misbehaving.seen_headers[-2:]
    assert first["Authorization"].startswith("Basic ")  # sent to the host named with the credentials
    assert "Authorization" not in second  # not forwarded to localhost, another host
    with pytest.raises(FetchError) as info:
        fetch(f"http://alice:s3cret@{host}:{port}/missing?token=abc", POLICY)
    assert "s3cret" not in str(info.value) and "abc" not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("ref,code", [
    ("memory://anything.png", "not_allowed"),
    ("simplecache::http://127.0.0.1:9/x.png", "not_allowed"),
    ("github://owner:repo@/README.md", "not_allowed"),
    ("a\x00b.png", "invalid_ref"),
    ("caf\udce9.png", "invalid_ref"),
])
def test_refused_references(ref, code):
    with pytest.raises(FetchError) as info:
        fetch(ref, POLICY)
    assert info.value.code == code


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    started = time.monotonic()
    for path, reason in [(fifo, "not a regular file (a FIFO)"), (Path("/dev/zero"), "not a regular file (a device)"),
                         (tmp_path, "not a regular file (a directory)"),
                         (Path("/proc/self/environ"), "file size changed while reading")]:
        with pytest.raises(FetchError) as info:
            fetch(str(path), POLICY)
        assert reason in info.value.reason, path
    assert time.monotonic() - started < 5  # the FIFO did not block


def root_with_a_link_out(tmp_path: Path, sub: str) -> tuple[Path, Path]:
    """<root>/<sub>/ok.png, and <root>/<sub>/link.png: a symlink to <outside>/secret.png."""
    root, outside = tmp_path / "dataset", tmp_path / "private"
    (root / sub).mkdir(parents=True)
    outside.mkdir()
    (root / sub / "ok.png").write_bytes(png_bytes(seed=1))
    (outside / "secret.png").write_bytes(png_bytes(seed=2))
    (root / sub / "link.png").symlink_to(outside / "secret.png")
    return root, outside


def test_confine_to_root_keeps_a_manifest_to_its_folder(tmp_path, data_params):
    root, outside = root_with_a_link_out(tmp_path, "img")
    (root / "img" / "inner.png").symlink_to(root / "img" / "ok.png")
    refs = ["img/ok.png", "img/inner.png", "img/link.png", "../private/secret.png", str(outside / "secret.png"),
            "/proc/self/environ", "http://127.0.0.1:9/x.png"]
    pd.DataFrame({"label": ["x"] * len(refs), "image": refs}).to_csv(root / "m.csv", index=False)
    for confine, readable in ((False, [True, True, True, True, True, False, False]),
                              (True, [True, True, False, False, False, False, False])):
        out = tmp_path / f"raw-{confine}"
        out.mkdir()
        collect.collect(data_params(source=str(root / "m.csv"), confine_to_root=confine), out)
        rows = pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()
        assert [r["image"] is not None for r in rows] == readable, confine
        if confine:
            assert all(r["image_error"].startswith("not_allowed: outside the manifest's root") for r in rows[2:]), rows
    assert within_root("https://h.org/data/a/b.png", "https://h.org/data")
    assert not within_root("https://h.org/data/../x.png", "https://h.org/data")
    assert not within_root("https://h.org/database/x.png", "https://h.org/data")
    assert not within_root("https://evil.org/data/x.png", "https://h.org/data")


def test_credentials_never_reach_stored_refs_or_messages(tmp_path, data_params):
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"], "image": ["https://bob:hunter2@127.0.0.1:9/a.png?X-Amz-Signature=abcd"]}).to_csv(
        manifest, index=False)
    out = tmp_path / "raw"
    out.mkdir()
    collect.collect(data_params(source=str(manifest), fetch_timeout_s=2), out)
    stored = (next(out.glob("part-*.parquet"))).read_bytes()
    assert b"hunter2" not in stored and b"abcd" not in stored
    row = pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()[0]
    assert row["image_ref"] == "https://***@127.0.0.1:9/a.png?X-Amz-Signature=***"
    assert row["image_error"].startswith("fetch_error: cannot fetch https://127.0.0.1:9/a.png?X-Amz-Signature=***: ")
    assert redact("postgresql://u:pw@db/x") == "postgresql://***@db/x"
    assert redact("GET https://h/x?sig=a1:b2&n=1: refused") == "GET https://h/x?sig=***&n=1: refused"


def test_folder_source_lists_what_it_cannot_read_and_keeps_to_its_root(tmp_path, data_params):
    root, outside = root_with_a_link_out(tmp_path, "cat")
    os.mkfifo(root / "cat" / "pipe.wav")
    (root / "cat" / "dangling.png").symlink_to(tmp_path / "missing.png")
    for confine in (False, True):
        out = tmp_path / f"raw-{confine}"
        out.mkdir()
        metrics = collect.collect(data_params(source=str(root), confine_to_root=confine), out)
        rows = {r["sample_id"]: r for r in pq.read_table(next(out.glob("part-*.parquet"))).to_pylist()}
        assert sorted(rows) == ["cat/dangling", "cat/link", "cat/ok", "cat/pipe"] and metrics["samples"] == 4
        assert rows["cat/ok"]["image"] is not None  # (none skipped: every file is a row, read or rejected)
        assert rows["cat/pipe"]["audio_error"].startswith("fetch_error: not a regular file (a FIFO)")
        if confine:  # both links point out of the folder
            assert rows["cat/link"]["image_error"].startswith("not_allowed: outside the manifest's root")
            assert rows["cat/dangling"]["image_error"].startswith("not_allowed: outside the manifest's root")
        else:
            assert rows["cat/dangling"]["image_error"].startswith("not_found")
            assert rows["cat/link"]["image"] == (outside / "secret.png").read_bytes()


def test_credentials_in_data_source_reach_neither_mlflow_nor_the_output(server, repo):
    """data.source = a URL with user:password@ and a token: the stages' prints, their MLflow params
    (the stage runs' and the pipeline row's) and data/source.json hold it redacted."""
    import subprocess
    import sys

    import mlflow

    from conftest import set_params, stage_env

    host = server.split("//")[1]
    set_params(repo, data={"source": f"http://alice:s3cret@{host}/manifest.csv?token=abc123"})
    for stage in ("source", "collect"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=repo, env=stage_env(repo),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "s3cret" not in proc.stdout + proc.stderr and "abc123" not in proc.stdout + proc.stderr
    assert "collect: 2 samples from http://***@" in proc.stdout
    assert "s3cret" not in (repo / "data/source.json").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = [value for run in runs for value in run.data.params.values()]
    assert any("***" in value for value in logged)
    assert not any("s3cret" in value or "abc123" in value for value in logged)
