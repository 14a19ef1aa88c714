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

from conftest import png_bytes, tone, wav_bytes
from mmpipe.data import collect
from mmpipe.data import source as data_source
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
    assert metrics["samples"] == 2 and metrics["present"] == {"image": 2, "text": 1, "audio": 1, "tabular": 0}
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
    assert str(info.value) == f"{path}: manifest has no 'label' column (data.target.column; columns: image)"


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


def test_fingerprint_changes_with_content(media, tmp_path, data_params):
    path = tmp_path / "m.csv"
    pd.DataFrame({"label": ["x"], "image": ["media/a.png"]}).to_csv(path, index=False)
    first = data_source.fingerprint(data_params(source=str(path)))
    assert data_source.fingerprint(data_params(source=str(path))) == first
    (media / "a.png").write_bytes(png_bytes(seed=99))
    assert data_source.fingerprint(data_params(source=str(path))) != first
    assert json.dumps(data_source.fingerprint(data_params(source="builtin:digits")))


def test_invalid_utf8_label_is_a_structural_error(tmp_path, data_params):
    path = tmp_path / "m.csv"
    path.write_bytes("label,text\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(PipelineError) as info:
        run(data_params, path, tmp_path)
    assert str(info.value) == f"{path}: row 1: column 'label' is not valid UTF-8"


# ---------------------------------------------------------------- manifests as users write them


def test_nullable_dtype_parquet_empty_cells_are_missing_not_the_text_NA(media, tmp_path, data_params):
    frame = pd.DataFrame({
        "label": pd.array([1, 2, None], dtype="Int64"),
        "image": pd.array(["media/a.png", None, "media/b.png"], dtype="string"),
        "text": pd.array(["one", "two", None], dtype="string[pyarrow]"),
        "split": pd.array([None, "train", None], dtype="string"),
    })
    frame.to_parquet(tmp_path / "m.parquet")
    _, raw = run(data_params, tmp_path / "m.parquet", tmp_path)
    assert list(raw.label[:2]) == ["1", "2"] and pd.isna(raw.label[2])
    assert raw.image[1] is None and pd.isna(raw.image_ref[1]) and pd.isna(raw.image_error[1])
    assert raw.text[2] is None and list(raw.split.fillna("-")) == ["-", "train", "-"]
    assert not [v for column in raw.columns for v in raw[column].tolist() if v in ("<NA>", b"<NA>")]


def test_jsonl_integer_labels_with_a_null_stay_integers(media, tmp_path, data_params):
    path = tmp_path / "m.jsonl"
    path.write_text('{"label": 1, "text": "a"}\n{"label": null, "text": "b"}\n\n{"label": 20, "text": "c", "id": 7}\n')
    _, raw = run(data_params, path, tmp_path)
    assert raw.label[0] == "1" and pd.isna(raw.label[1]) and raw.label[2] == "20" and raw.sample_id[2] == "7"
    path.write_text('{"label": 1, "text": "a"}\n{"label": 2, "text": \n')
    (tmp_path / "again").mkdir()
    with pytest.raises(PipelineError) as info:
        run(data_params, path, tmp_path / "again")
    assert str(info.value).startswith(f"{path}: line 2: not valid JSON")


def test_bad_path_cells_are_that_item_s_error(media, tmp_path, data_params):
    """A NUL byte, invalid UTF-8 (non-UTF-8 CSV) in a path: one reject each, the other rows collected."""
    path = tmp_path / "m.csv"
    path.write_bytes(b"label,image,text,caf\xe9\n"
                     b"x,media/a\x00b.png,fine,1\n"
                     b"y,media/caf\xe9.png,also fine,2\n"
                     b"z,media/a.png,caf\xe9 latin-1,3\n")
    metrics, raw = run(data_params, path, tmp_path)
    assert raw.image_error[0].startswith("invalid_ref: reference contains a NUL byte")
    assert raw.image_error[1].startswith("invalid_ref: reference is not valid UTF-8")
    assert raw.image_ref[1].endswith("caf\\udce9.png")  # stored as valid UTF-8
    assert raw.image[2] == (media / "a.png").read_bytes() and raw.text[2] == b"caf\xe9 latin-1"
    assert metrics["fetch_errors"]["image"] == 2


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_long_text_field_is_collected_then_truncated_by_clean(fmt, tmp_path, data_params, clean_params):
    from mmpipe.data.clean import clean

    long_text = "word " * 60_000  # 300 KB in one cell
    rows = pd.DataFrame({"label": ["a", "a", "b", "b"], "text": [long_text, "short a", "short b", "other b"]})
    path = tmp_path / f"m.{fmt}"
    {"csv": lambda: rows.to_csv(path, index=False), "jsonl": lambda: rows.to_json(path, orient="records", lines=True),
     "parquet": lambda: rows.to_parquet(path)}[fmt]()
    _, raw = run(data_params, path, tmp_path)
    assert raw.text[0] == long_text.encode()
    (tmp_path / "clean").mkdir()
    metrics = clean(clean_params(min_per_class=1), tmp_path / "raw", tmp_path / "clean")
    assert metrics["kept"] == 4 and metrics["truncated"] == 1


def test_duplicated_column_is_a_structural_error(tmp_path, data_params):
    path = tmp_path / "m.csv"
    path.write_text("label,text,text\nx,a,b\n")
    with pytest.raises(PipelineError) as info:
        run(data_params, path, tmp_path)
    assert str(info.value) == f"{path}: manifest has the column 'text' more than once"


def test_large_media_make_row_groups_bounded_by_bytes_and_clean_batches_too(tmp_path, data_params, clean_params,
                                                                            monkeypatch):
    from mmpipe import io as mmio
    from mmpipe.data import clean

    folder = tmp_path / "media"
    folder.mkdir()
    names = []
    for i in range(7):  # ~32 KB recordings: with a 70 KB budget, two per batch
        (folder / f"{i}.wav").write_bytes(wav_bytes(tone(1.0, freq=200.0 + 50 * i)))
        names.append(f"media/{i}.wav")
    pd.DataFrame({"label": ["a", "b"] * 3 + ["a"], "audio": names}).to_csv(tmp_path / "m.csv", index=False)
    monkeypatch.setattr(collect, "BATCH_BYTES", 70_000)
    metrics, raw = run(data_params, tmp_path / "m.csv", tmp_path)
    meta = pq.ParquetFile(next((tmp_path / "raw").glob("part-*.parquet"))).metadata
    assert metrics["samples"] == 7 and [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2, 2, 2, 1]
    assert list(raw.source_row) == list(range(7)) and raw.audio.notna().all()  # order kept across batches

    # clean's batches (two per worker in flight) are cut by bytes the same way, whatever batch_rows says
    table = pq.read_table(next((tmp_path / "raw").glob("part-*.parquet")))
    assert [len(s) for s in mmio.bounded_slices(table, max_rows=512, max_bytes=70_000)] == [2, 2, 2, 1]
    assert [len(s) for s in mmio.bounded_slices(table, max_rows=3, max_bytes=10**9)] == [3, 3, 1]
    assert [len(s) for s in mmio.bounded_slices(table, max_rows=512, max_bytes=10)] == [1] * 7  # one row at least
    monkeypatch.setattr(clean, "bounded_slices", lambda t, rows: mmio.bounded_slices(t, rows, 70_000))
    assert [len(b) for b in clean._raw_batches(tmp_path / "raw", 512)] == [2, 2, 2, 1]


@pytest.mark.slow
def test_manifest_rows_and_columns_are_bounded_before_the_table_is_built(tmp_path, data_params):
    """Bytes do not bound cells: a few KB of Parquet hold 300,000 rows (run-length encoding), a JSONL
    whose lines each bring their own key grows as keys x rows in a dense table. Each is refused in one
    line from what is known before the table is built (footer, header, keys while parsing)."""
    import tracemalloc

    import pyarrow as pa

    many = tmp_path / "rle.parquet"
    pq.write_table(pa.table({"label": pa.array(["x"] * 300_000).dictionary_encode(),
                             "text": pa.array(["a"] * 300_000).dictionary_encode()}), many, compression="zstd")
    assert many.stat().st_size < 20_000
    with pytest.raises(PipelineError, match=r"^\S+rle.parquet: manifest has more than 100,000 rows \(300,000\) "
                                            r"\(data.max_manifest_rows\): split it, or raise the limit$"):
        collect.collect(data_params(source=str(many), max_manifest_rows=100_000), tmp_path)
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(["label", "text", *(f"c{i}" for i in range(3000))]) + "\nx,a\n")
    with pytest.raises(PipelineError, match=r"manifest has more than 2,048 columns \(data.max_manifest_columns\)"):
        collect.collect(data_params(source=str(wide)), tmp_path)
    long = tmp_path / "long.csv"
    long.write_text("label,text\n" + "x,a\n" * 1001)
    with pytest.raises(PipelineError, match=r"more than 1,000 rows \(data.max_manifest_rows\)"):
        collect.collect(data_params(source=str(long), max_manifest_rows=1000), tmp_path)
    keys = tmp_path / "keys.jsonl"
    keys.write_text("".join(json.dumps({"label": "x", "text": "a", f"k{i}": i}) + "\n" for i in range(20_000)))
    assert keys.stat().st_size < 1_000_000
    with pytest.raises(PipelineError, match=r"more than 2,048 distinct columns \(keys over all lines\) \(data.max_manifest_columns\)"):
        collect.collect(data_params(source=str(keys)), tmp_path)
    # under a raised limit the same file costs memory in proportion to its size, not keys x rows
    out = tmp_path / "raw"
    out.mkdir()
    tracemalloc.start()
    try:
        metrics = collect.collect(data_params(source=str(keys), max_manifest_columns=100_000,
                                              tabular={"columns": {"k1": "numeric", "k19999": "numeric"}}), out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert metrics["samples"] == 20_000 and metrics["present"]["tabular"] == 2
    assert peak < 60e6, f"collect peaked at {peak / 1e6:.0f} MB of Python allocations"
    raw = read_raw(out)
    assert raw.tabular[1] == b'{"k1": 1}' and raw.tabular[19_999] == b'{"k19999": 19999}'


def test_a_symlinked_label_folder_is_followed_and_what_is_not_read_is_listed(tmp_path, data_params, capsys):
    """A label folder that is a symlink (data kept elsewhere) was skipped without a word."""
    elsewhere = tmp_path / "elsewhere" / "dogs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "d1.png").write_bytes(png_bytes(seed=3))
    root = tmp_path / "data"
    (root / "cat" / "deeper").mkdir(parents=True)
    (root / "cat" / "c1.png").write_bytes(png_bytes(seed=1))
    (root / "cat" / "deeper" / "c2.png").write_bytes(png_bytes(seed=2))
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle: read one level down, no further
    metrics, raw = run(data_params, root, tmp_path)
    assert sorted(raw.sample_id) == ["cat/c1", "dog/d1"] and metrics["per_label"] == {"cat": 1, "dog": 1}
    assert raw.set_index("sample_id").image["dog/d1"] == (elsewhere / "d1.png").read_bytes()
    out = capsys.readouterr().out
    assert "collect: ignoring 4 entries outside <label>/<stem>.<ext> or of unknown type: cat/deeper/, loop/cat/, " \
           "loop/dog/, loop/loop/" in out
    # the source fingerprint follows the same files: a change behind the link re-runs collect
    before = data_source.fingerprint(data_params(source=str(root)))
    (elsewhere / "d1.png").write_bytes(png_bytes(seed=4))
    assert data_source.fingerprint(data_params(source=str(root)))["files"]["dog/d1.png"] != before["files"]["dog/d1.png"]
