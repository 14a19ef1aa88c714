"""preprocess and the loader: parity with the naive baselines, train-only state, shards, errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bench import naive
from conftest import png_bytes
from mmpipe import params
from mmpipe.data.clean import clean
from mmpipe.data.collect import collect
from mmpipe.errors import PipelineError
from mmpipe.features.loader import FeatureSet
from mmpipe.features.preprocess import preprocess, resolved
from mmpipe.names import SAMPLES_DIR, shard_path
from mmpipe.modalities import names
from mmpipe.modalities import image as image_modality
from mmpipe.modalities.tokenizer import Tokenizer

PREP = params.PreprocessParams(workers=1, shard_rows=128, batch_rows=50)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A 300-sample built-in corpus through collect and clean."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "raw").mkdir()
    (root / "clean").mkdir()
    data = params.validate("data", {"n_samples": 300, "workers": 1, "builtin": {"tts_variants": 6}})
    collect(data, root / "raw")
    clean(params.validate("clean", {"workers": 1}), root / "raw", root / "clean")
    return root / "clean"


def clean_rows(clean_dir: Path) -> list[dict]:
    return [r for p in sorted((clean_dir / SAMPLES_DIR).glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]


def run(modality, clean_dir, out, prep=PREP):
    out.mkdir(parents=True, exist_ok=True)
    return preprocess(modality, prep, clean_dir, out)


def row_features(out: Path, name: str, rows, shard_rows=PREP.shard_rows) -> np.ndarray:
    return np.stack([np.load(shard_path(out, name, r // shard_rows))[r % shard_rows] for r in rows])


@pytest.fixture(scope="module")
def features(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features")
    for m in names():  # the corpus has no metadata: preprocess@tabular is a no-op the loader skips
        run(m, corpus, out / m)
    return out


def test_audio_matches_naive_librosa_within_float16_rounding(corpus, features, tmp_path):
    rows = clean_rows(corpus)
    state = json.loads((features / "audio/state.json").read_text())
    picked = [i for i, r in enumerate(rows) if r["audio_available"]][:40]
    for i in picked:
        (tmp_path / f"{i}.wav").write_bytes(rows[i]["audio"])
        naive.audio_file_features(tmp_path / f"{i}.wav", tmp_path / f"{i}.npy", state["sample_rate"],
                                  resolved(PREP, corpus).audio)  # seconds: auto, as preprocess resolved it
    theirs = np.stack([np.load(tmp_path / f"{i}.npy") for i in picked]).astype(np.float32)
    ours = row_features(features / "audio", "audio", picked).astype(np.float32)
    assert ours.shape == theirs.shape == (40, 64, 151)
    np.testing.assert_allclose(ours, theirs, rtol=2.0**-9, atol=2.0**-12)  # a float16 step or two


def test_images_match_naive_pil_exactly(corpus, features, tmp_path):
    rows = clean_rows(corpus)
    picked = [i for i, r in enumerate(rows) if r["image_available"]][:60]
    for i in picked:
        naive.image_file_features(io.BytesIO(rows[i]["image"]), tmp_path / f"{i}.npy", resolved(PREP, corpus).image)
    theirs = np.stack([np.load(tmp_path / f"{i}.npy") for i in picked])
    assert np.array_equal(row_features(features / "image", "image", picked), theirs)


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("L", "JPEG")])
def test_fast_decoder_gives_pillows_pixels(mode, fmt):
    data = png_bytes(mode, size=(32, 32), seed=4, fmt=fmt)
    for target in ("rgb", "grayscale"):
        fast = image_modality.decode_fast(data, 32, 3 if target == "rgb" else 1)
        if target == "grayscale" and mode == "RGB":
            assert fast is None  # Pillow's RGB -> L formula: Pillow path
            continue
        expected = image_modality.load_pixels(data, 32, target, "pad")
        assert np.array_equal(np.broadcast_to(fast, expected.shape), expected)


def test_non_square_images_are_padded_or_cropped():
    data = png_bytes("RGB", size=(64, 32), seed=1)
    assert image_modality.decode_fast(data, 32, 3) is None  # needs a resize: Pillow path
    padded = image_modality.load_pixels(data, 32, "rgb", "pad")
    assert padded.shape == (3, 32, 32) and (padded[:, :8] == 0).all() and (padded[:, -8:] == 0).all()
    cropped = image_modality.load_pixels(data, 32, "rgb", "crop")
    assert cropped.shape == (3, 32, 32) and (cropped[:, :8] != 0).any()
    gray = image_modality.load_pixels(data, 16, "grayscale", "pad")
    assert gray.shape == (1, 16, 16)


def test_index_and_unavailable_rows_are_zero(corpus, features):
    rows = clean_rows(corpus)
    for m, name in (("image", "image"), ("audio", "audio"), ("text", "text")):
        index = pq.read_table(features / m / "index.parquet").to_pylist()
        assert [r["sample_id"] for r in index] == [r["sample_id"] for r in rows]
        assert [r["available"] for r in index] == [r[f"{m}_available"] for r in rows]
        assert [(r["shard"], r["row"]) for r in index] == [divmod(i, PREP.shard_rows) for i in range(len(rows))]
        missing = [i for i, r in enumerate(index) if not r["available"]]
        assert missing and not row_features(features / m, name, missing).any()


def test_state_is_fitted_on_train_only(corpus, features):
    rows = clean_rows(corpus)
    train = [i for i, r in enumerate(rows) if r["split"] == "train" and r["image_available"]]
    everything = [i for i, r in enumerate(rows) if r["image_available"]]
    state = json.loads((features / "image/state.json").read_text())
    pixels = row_features(features / "image", "image", train).astype(np.float64) / 255
    np.testing.assert_allclose(state["mean"], pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(state["std"], pixels.std(axis=(0, 2, 3)), rtol=1e-6)
    all_pixels = row_features(features / "image", "image", everything).astype(np.float64) / 255
    assert not np.allclose(state["mean"], all_pixels.mean(axis=(0, 2, 3)), rtol=1e-9)

    audio_state = json.loads((features / "audio/state.json").read_text())
    train_audio = [i for i, r in enumerate(rows) if r["split"] == "train" and r["audio_available"]]
    mel = row_features(features / "audio", "audio", train_audio).astype(np.float64)
    np.testing.assert_allclose(audio_state["mean"], mel.mean(axis=(0, 2)), rtol=1e-9)
    assert len(audio_state["mean"]) == 64


def test_vocabulary_comes_from_train_only(tmp_path):
    """Val/test texts use characters never seen in train: none of them may enter the vocabulary."""
    clean_dir = tmp_path / "clean"
    (clean_dir / SAMPLES_DIR).mkdir(parents=True)
    texts = {"train": ["abc abc", "cab", "bca"] * 3, "val": ["xyz"] * 4, "test": ["qqq"] * 4}
    samples = [{"sample_id": f"{s}{i}", "source_row": n, "label": "a", "split": s, "text": t, "text_available": True}
               for n, (s, i, t) in enumerate((s, i, t) for s, ts in texts.items() for i, t in enumerate(ts))]
    pq.write_table(pa.Table.from_pylist(samples), clean_dir / SAMPLES_DIR / "part-00000.parquet")
    (clean_dir / "dataset.json").write_text(json.dumps({"labels": ["a"], "clean_rules": {"audio": {"sample_rate": 16000}}}))
    prep = params.PreprocessParams(workers=1, text={"min_freq": 1})
    run("text", clean_dir, tmp_path / "text", prep)
    tokenizer = Tokenizer.load(tmp_path / "text/tokenizer.json")
    assert set(tokenizer.vocab) == {"<pad>", "<unk>", "a", "b", "c", " "}
    ids = np.load(tmp_path / "text/text-00000.npy")
    lengths = np.load(tmp_path / "text/text_length-00000.npy")
    assert (ids[9:] <= 1).all() and (ids[9:, :3] == 1).all() and list(lengths[9:]) == [3] * 8  # <unk>


def test_shards_are_byte_identical_across_runs_and_worker_counts(corpus, features, tmp_path):
    for m in ("image", "audio", "text"):
        run(m, corpus, tmp_path / m, params.PreprocessParams(workers=2, shard_rows=128, batch_rows=50))
        for f in sorted((features / m).iterdir()):
            assert f.read_bytes() == (tmp_path / m / f.name).read_bytes(), f.name


def test_undecodable_clean_item_is_listed_and_made_unavailable_not_fatal(corpus, tmp_path, capsys):
    broken = tmp_path / "clean"
    (broken / SAMPLES_DIR).mkdir(parents=True)
    (broken / "dataset.json").write_text((corpus / "dataset.json").read_text())
    table = pq.read_table(next((corpus / SAMPLES_DIR).glob("part-*.parquet")))
    rows = table.to_pylist()
    victim = next(i for i, r in enumerate(rows) if r["audio_available"] and r["split"] == "train")
    rows[victim]["audio"] = b"RIFF\x00\x00not really audio"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), broken / SAMPLES_DIR / "part-00000.parquet")
    metrics = run("audio", broken, tmp_path / "audio")
    sid = rows[victim]["sample_id"]
    assert metrics["decode_failed"] == 1 and metrics["decode_failed_samples"][sid].startswith("audio does not decode")
    assert "at 0x" not in metrics["decode_failed_samples"][sid]  # no object addresses in messages
    assert f"sample {sid}: audio does not decode" in capsys.readouterr().out
    index = pq.read_table(tmp_path / "audio" / "index.parquet").to_pylist()
    assert index[victim]["sample_id"] == sid and not index[victim]["available"]
    assert metrics["available"] == sum(r["audio_available"] for r in rows) - 1
    # the train statistics leave it out: they equal those of the data without the item
    rows[victim]["audio"], rows[victim]["audio_available"] = None, False
    (tmp_path / "without" / SAMPLES_DIR).mkdir(parents=True)
    (tmp_path / "without" / "dataset.json").write_text((corpus / "dataset.json").read_text())
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "without" / SAMPLES_DIR / "part-00000.parquet")
    run("audio", tmp_path / "without", tmp_path / "audio_without")
    state = lambda folder: json.loads((folder / "state.json").read_text())  # noqa: E731
    assert state(tmp_path / "audio")["mean"] == state(tmp_path / "audio_without")["mean"]


def test_loader_joins_modalities_and_gathers_batches(corpus, features):
    rows = clean_rows(corpus)
    train = FeatureSet(features, split="train")
    expected = [r for r in rows if r["split"] == "train"]
    assert len(train) == len(expected) and list(train.sample_ids) == [r["sample_id"] for r in expected]
    batch = train.get(np.array([3, 0, 7]))
    assert batch["image"].shape == (3, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["audio"].shape == (3, 64, 151) and batch["audio"].dtype == torch.float16
    assert batch["text"].shape == (3, 48) and batch["text_length"].shape == (3,)
    labels = train.label_names
    assert [labels[i] for i in batch["label"]] == [expected[i]["label"] for i in (3, 0, 7)]
    for m in ("image", "text", "audio"):
        assert batch[f"available.{m}"].tolist() == [expected[i][f"{m}_available"] for i in (3, 0, 7)]
    global_rows = [rows.index(expected[i]) for i in (3, 0, 7)]
    assert np.array_equal(batch["image"].numpy(), row_features(features / "image", "image", global_rows))
    seen = np.concatenate([b["index"].numpy() for b in train.batches(64, shuffle=True, seed=1)])
    assert sorted(seen) == list(range(len(train)))
    first = next(iter(train.batches(64, shuffle=True, seed=1)))
    held = FeatureSet(features, split="train").to("cpu")
    again = held.get(first["index"].numpy())
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_epochs_cover_the_split_with_equal_batches_per_rank(features, n_shards):
    train = FeatureSet(features, split="train")
    per_rank = [[b["index"].numpy() for b in train.batches(16, shuffle=True, seed=5, shard=(rank, n_shards))]
                for rank in range(n_shards)]
    assert len({len(batches) for batches in per_rank}) == 1  # DDP: every rank takes the same number of steps
    seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert set(seen) == set(range(len(train)))
    assert len(seen) == -(-len(train) // n_shards) * n_shards  # padded by fewer than n_shards repeats


def test_loader_refuses_misaligned_modalities(features, tmp_path):
    import shutil

    shutil.copytree(features, tmp_path / "f")
    index = pq.read_table(tmp_path / "f/text/index.parquet").to_pylist()
    index[0]["sample_id"], index[1]["sample_id"] = index[1]["sample_id"], index[0]["sample_id"]
    pq.write_table(pa.Table.from_pylist(index), tmp_path / "f/text/index.parquet")
    with pytest.raises(PipelineError, match="samples differ"):
        FeatureSet(tmp_path / "f", split="train")


def test_fmax_above_nyquist_is_refused(corpus, tmp_path):
    prep = params.PreprocessParams(workers=1, audio={"fmax": 9000.0})
    with pytest.raises(PipelineError, match="preprocess.audio.fmax=9000.0 exceeds half the sample rate"):
        run("audio", corpus, tmp_path / "a", prep)


def test_tokenizer_round_trip(tmp_path):
    tok = Tokenizer.fit(["Seven sevens", "one"], "word", True, 10, 1, 4)
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    ids, lengths = again.encode(["seven one two", None])
    assert again.vocab == tok.vocab and lengths.tolist() == [3, 0]
    assert ids[0, 2] == 1 and ids[1].sum() == 0


@pytest.mark.parametrize("rate,n_fft,n_mels,fmin,fmax", [(16000, 512, 64, 20.0, 8000.0), (22050, 1024, 128, 0.0, 11025.0),
                                                         (8000, 256, 40, 50.0, 3000.0)])
def test_mel_filter_bank_is_librosas(rate, n_fft, n_mels, fmin, fmax):
    import librosa

    from mmpipe.modalities import logmel

    expected = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert np.array_equal(logmel.mel_filters(rate, n_fft, n_mels, fmin, fmax), expected)


def test_torch_log_mel_matches_numpy():
    from mmpipe.modalities import logmel

    clips = np.random.default_rng(0).normal(0, 0.1, (4, 8000)).astype(np.float32)
    filters = logmel.mel_filters(16000, 512, 64, 20.0, 8000.0)
    ours = logmel.log_mel(clips, filters, 512, 160)
    theirs = logmel.log_mel_torch(torch.from_numpy(clips), filters, 512, 160).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_joining_partitions_refuses_missing_or_stale_ones_in_one_line(tiny_corpus, tmp_path):
    from mmpipe.features.preprocess import preprocess, preprocess_part

    cfg = params.validate("preprocess", {"workers": 1, "shard_rows": 64, "partitions": [0, 1]})
    parts = tmp_path / "parts"
    for k in (0, 1):
        (parts / str(k)).mkdir(parents=True)
        preprocess_part("text", cfg, tiny_corpus / "clean", parts / str(k), k)
    joined = tmp_path / "joined"
    joined.mkdir()
    assert preprocess("text", cfg, tiny_corpus / "clean", joined, parts_dir=parts)["partitions"] == 2
    single = tmp_path / "single"
    single.mkdir()
    preprocess("text", cfg.model_copy(update={"partitions": []}), tiny_corpus / "clean", single)
    assert {p.name: p.read_bytes() for p in joined.iterdir()} == {p.name: p.read_bytes() for p in single.iterdir()}

    other = params.validate("preprocess", {"workers": 1, "shard_rows": 32, "partitions": [0, 1]})
    with pytest.raises(PipelineError, match=r"parts/0: built from other data or settings than this run "
                                            r"\(re-run the preprocess-part@text-0 stage\)"):
        preprocess("text", other, tiny_corpus / "clean", tmp_path / "out", parts_dir=parts)
    three = params.validate("preprocess", {"workers": 1, "shard_rows": 64, "partitions": [0, 1, 2]})
    with pytest.raises(PipelineError, match=r"parts/0: built from other data"):  # its place changed with N
        preprocess("text", three, tiny_corpus / "clean", tmp_path / "out", parts_dir=parts)
    with pytest.raises(PipelineError, match=r"preprocess.partitions.*must be \[\] or \[0, 1, \.\.\., N-1\]"):
        params.validate("preprocess", {"partitions": [1, 2]})
    # the same number of samples, labels and settings, but other content: refused too
    changed = tmp_path / "clean"
    shutil.copytree(tiny_corpus / "clean", changed)
    part_file = sorted((changed / "samples").glob("part-*.parquet"))[0]
    table = pq.read_table(part_file)
    texts = table.column("text").to_pylist()
    first = next(i for i, t in enumerate(texts) if t)
    texts[first] = texts[first] + " changed"
    pq.write_table(table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string())), part_file)
    with pytest.raises(PipelineError, match=r"parts/0: built from other data or settings than this run"):
        preprocess("text", cfg, changed, tmp_path / "out2", parts_dir=parts)
    # a shard file of a partition gone: one line naming it, not a traceback
    next((parts / "1").glob("*.npy")).unlink()
    (tmp_path / "out3").mkdir()
    with pytest.raises(PipelineError, match=r"\.npy: missing or unreadable \(No such file or directory; re-run the "
                                            r"preprocess-part@text-1 stage\)"):
        preprocess("text", cfg, tiny_corpus / "clean", tmp_path / "out3", parts_dir=parts)


def test_a_plain_dataloader_over_the_dataset_face_sees_the_loaders_batches(tiny_corpus):
    """FeatureSet as a torch Dataset (what Lightning / HF Trainer take): a plain DataLoader loop gets the
    batches FeatureSet.batches reads — the same shuffle and seed through batch_sampler, the same rows in
    order with DataLoader's own batching — and one sample is the batch's row."""
    from torch.utils.data import DataLoader

    features = FeatureSet(tiny_corpus / "features", "train")
    data = features.dataset()
    assert isinstance(data, torch.utils.data.Dataset) and len(data) == len(features) > 64

    def same(a: dict, b: dict) -> None:
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    expected = list(features.batches(32, shuffle=True, seed=7))
    loader = DataLoader(data, batch_sampler=data.batch_sampler(32, shuffle=True, seed=7), collate_fn=data.collate)
    assert len(loader) == len(expected)
    for _ in range(2):  # re-iterable: every epoch the same batches
        seen = list(loader)
        assert len(seen) == len(expected)
        for got, want in zip(seen, expected):
            same(got, want)
    ordered = list(DataLoader(data, batch_size=50, collate_fn=data.collate))
    for got, want in zip(ordered, features.batches(50), strict=True):
        same(got, want)
    one = data[5]
    assert one["image"].shape == expected[0]["image"].shape[1:] and one["label"].shape == ()
    same(data.collate([data[5], data[6]]), features.get(np.array([5, 6])))
    with pytest.raises(IndexError):
        data[len(data)]
    # worker processes (forked) read the memory-mapped shards too
    workers = list(DataLoader(data, batch_size=50, collate_fn=data.collate, num_workers=2))
    for got, want in zip(workers, ordered, strict=True):
        same(got, want)
