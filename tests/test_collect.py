"""collect's three sources: manifests (csv/jsonl/parquet, local and URL), folders, structural errors."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes, wav_bytes
from mmpipe.data import collect
from mmpipe.errors import PipelineError


def read_raw(out: Path) -> pd.DataFrame:
    return pd.DataFrame([r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()])


@pytest.fixture
def media(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes("RGB", seed=1))
    (folder / "b.png").write_bytes(png_bytes("L", seed=2))
    (folder / "a.wav").write_bytes(wav_bytes())
    return folder


def run(data_params, source, tmp_path, **kw):
    out = tmp_path / "raw"
    out.mkdir()
    metrics = collect.collect(data_params(source=str(source), **kw), out)
    return metrics, read_raw(out)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_with_relative_paths(fmt, media, tmp_path, data_params):
    rows = pd.DataFrame({"label": ["cat", "dog"], "image": ["media/a.png", "media/b.png"],
                         "audio": ["media/a.wav", None], "text": ["a cat", None]})
    path = tmp_path / f"manifest.{fmt}"
    {"csv": lambda: rows.to_csv(path, index=False),
     "jsonl": lambda: rows.to_json(path, orient="records", lines=True),
     "parquet": lambda: rows.to_parquet(path)}[fmt]()
    metrics, raw = run(data_params, path, tmp_path)
    assert metrics["samples"] == 2 and metrics["present"] == {"image": 2, "text": 1, "audio": 1}
    assert raw.loc[0, "image"] == (media / "a.png").read_bytes()
    assert raw.loc[0, "audio"] == (media / "a.wav").read_bytes()
    assert raw.loc[0, "text"] == b"a cat"
    assert raw.loc[1, "audio"] is None and pd.isna(raw.loc[1, "audio_ref"])
    assert raw.loc[0, "image_ref"] == str(media / "a.png")
    assert list(raw.source_row) == [0, 1]


def test_ids_given_or_derived_from_content_refs(media, tmp_path, data_params):
    path = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x", "x"], "image": ["media/a.png", "media/b.png"], "id": ["first", None]}).to_csv(path, index=False)
    _, raw = run(data_params, path, tmp_path)
    assert raw.sample_id[0] == "first" and raw.sample_id[1].startswith("m-")
    # derived ids do not depend on row order
    pd.DataFrame({"label": ["x"], "image": ["media/b.png"]}).to_csv(path, index=False)
    out2 = tmp_path / "raw2"
    out2.mkdir()
    collect.collect(data_params(source=str(path)), out2)
    assert read_raw(out2).sample_id[0] == raw.sample_id[1]


def test_missing_file_is_recorded_not_fatal(media, tmp_path, data_params):
    path = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"], "image": ["media/nope.png"]}).to_csv(path, index=False)
    metrics, raw = run(data_params, path, tmp_path)
    assert metrics["fetch_errors"]["image"] == 1
    assert raw.image[0] is None and raw.image_error[0].startswith("not_found: file not found: ")
    assert raw.image_error[0].endswith("nope.png")


def test_file_size_limit(media, tmp_path, data_params):
    path = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"], "audio": ["media/a.wav"]}).to_csv(path, index=False)
    _, raw = run(data_params, path, tmp_path, max_file_mb=0.001)
    assert raw.audio_error[0].startswith("too_large: ") and "data.max_file_mb" in raw.audio_error[0]


def test_manifest_without_label_column_fails_in_one_line(media, tmp_path, data_params):
    path = tmp_path / "m.csv"
    pd.DataFrame({"image": ["media/a.png"]}).to_csv(path, index=False)
    with pytest.raises(PipelineError) as info:
        run(data_params, path, tmp_path)
    assert str(info.value) == f"{path}: manifest has no 'label' column (columns: image)"


@pytest.mark.parametrize("source,message", [
    ("/nonexistent/manifest.csv", "data.source: /nonexistent/manifest.csv does not exist"),
    ("builtin:letters", "unknown built-in corpus 'builtin:letters'"),
])
def test_bad_source_fails_in_one_line(source, message, tmp_path, data_params):
    with pytest.raises(PipelineError) as info:
        run(data_params, source, tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unsupported_manifest_type(tmp_path, data_params):
    path = tmp_path / "m.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(PipelineError, match="unsupported manifest type '.xlsx'"):
        run(data_params, path, tmp_path)


def test_folder_layout_groups_files_by_stem(tmp_path, data_params):
    root = tmp_path / "ds"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "cat" / "x1.png").write_bytes(png_bytes())
    (root / "cat" / "x1.wav").write_bytes(wav_bytes())
    (root / "cat" / "x1.txt").write_bytes(b"meow")
    (root / "cat" / "x2.JPG").write_bytes(png_bytes(fmt="JPEG"))
    (root / "dog" / "y.flac").write_bytes(wav_bytes(fmt="FLAC"))
    (root / "dog" / "notes.md").write_text("ignored")
    (root / "dog" / "z.png").write_bytes(png_bytes())
    (root / "dog" / "z.jpg").write_bytes(png_bytes(fmt="JPEG"))
    metrics, raw = run(data_params, root, tmp_path)
    raw = raw.set_index("sample_id")
    assert sorted(raw.index) == ["cat/x1", "cat/x2", "dog/y", "dog/z"]
    assert raw.loc["cat/x1", "text"] == b"meow" and raw.loc["cat/x1", "audio"] is not None
    assert raw.loc["cat/x2", "image"] is not None and raw.loc["dog/y", "label"] == "dog"
    assert raw.loc["dog/z", "image_error"] == "conflict: several image files share this stem: z.jpg, z.png"
    assert metrics["per_label"] == {"cat": 2, "dog": 2}


def test_empty_folder_fails(tmp_path, data_params):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="holds no <label>/<stem>.<ext> files"):
        run(data_params, tmp_path / "empty", tmp_path)


def test_urls_through_fsspec(media, tmp_path, data_params):
    """Manifest and files served over HTTP on loopback; a file:// reference too."""
    served = tmp_path / "site"
    served.mkdir()
    (served / "img.png").write_bytes((media / "a.png").read_bytes())
    pd.DataFrame({"label": ["a", "b", "c"],
                  "image": ["img.png", "missing.png", (media / "b.png").as_uri()]}).to_csv(served / "m.csv", index=False)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/m.csv"
        metrics, raw = run(data_params, url, tmp_path)
    finally:
        server.shutdown()
    assert raw.image[0] == (media / "a.png").read_bytes()
    assert raw.image_ref[0].endswith("/img.png") and raw.image_ref[0].startswith("http://127.0.0.1")
    assert raw.image[1] is None and "not found" in raw.image_error[1]
    assert raw.image[2] == (media / "b.png").read_bytes()
    assert metrics["fetch_errors"]["image"] == 1


def test_builtin_source_is_parallel_and_deterministic(tmp_path, data_params):
    outs = []
    for workers, name in ((1, "a"), (2, "b")):
        out = tmp_path / name
        out.mkdir()
        metrics = collect.collect(data_params(n_samples=600, workers=workers, rows_per_file=250), out)
        outs.append(out)
    assert metrics["files"] == 3 and metrics["samples"] == 600
    for part in sorted(outs[0].glob("*.parquet")):
        assert part.read_bytes() == (outs[1] / part.name).read_bytes()


def test_fingerprint_changes_with_content(media, tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"], "image": ["media/a.png"]}).to_csv(path, index=False)
    first = collect.fingerprint(str(path))
    assert collect.fingerprint(str(path)) == first
    (media / "a.png").write_bytes(png_bytes(seed=99))
    assert collect.fingerprint(str(path)) != first
    assert json.dumps(collect.fingerprint("builtin:digits"))


def test_invalid_utf8_label_is_a_structural_error(tmp_path, data_params):
    path = tmp_path / "m.csv"
    path.write_bytes("label,text\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(PipelineError) as info:
        run(data_params, path, tmp_path)
    assert str(info.value) == f"{path}: row 1: column 'label' is not valid UTF-8"
