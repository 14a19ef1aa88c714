"""Seeded fuzzing of every raw-item decoder: thousands of mutants of real PNG/JPEG/GIF/BMP/TIFF/WebP,
WAV/FLAC and UTF-8 files (byte flips, truncations, header lies, EXIF corruption) through clean's item
validation and through the bundle's predictor. Nothing may escape: every mutant ends as a valid
item / prediction input or as a reject / error with a one-line reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import tone
from mmpipe import params
from mmpipe.data.clean import validate_sample
from mmpipe.deploy.verify import load_predictor
from mmpipe.modalities import names
from mmpipe.modalities.portable import RejectedInput

N_MUTANTS = {"image": 1200, "audio": 900, "text": 300, "tabular": 300}  # 2,700 in all
RECORD_COLUMNS = {"age": "numeric", "height": "numeric", "country": "categorical", "device": "categorical"}


def _image(mode: str, fmt: str, size=(24, 20), seed: int = 0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def _exif(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A raw little-endian EXIF block (tag, type, count, 4-byte value) — types may lie on purpose."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI4s", *e) for e in entries) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (valid CRC), with one short IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _wav_lie(data: bytes, rate: int | None = None, channels: int | None = None, data_size: int | None = None) -> bytes:
    out = bytearray(data)
    fmt = out.index(b"fmt ") + 8
    if channels is not None:
        out[fmt + 2:fmt + 4] = struct.pack("<H", channels)
    if rate is not None:
        out[fmt + 4:fmt + 8] = struct.pack("<I", rate)
    if data_size is not None:
        pos = out.index(b"data") + 4
        out[pos:pos + 4] = struct.pack("<I", data_size)
    return bytes(out)


def _wav(seconds=0.4, rate=16000, channels=1, fmt="WAV", subtype="PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, tone(seconds, rate, channels), rate, format=fmt, subtype=subtype)
    return out.getvalue()


def seeds() -> dict[str, list[bytes]]:
    rotated = Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    exif_ok, exif_ascii, exif_long = io.BytesIO(), io.BytesIO(), io.BytesIO()
    rotated.save(exif_ok, "JPEG", exif=_exif([(0x0112, 3, 1, struct.pack("<HH", 6, 0))]))
    rotated.save(exif_ascii, "JPEG", exif=_exif([(0x0112, 2, 2, b"x\x00\x00\x00")]))  # Orientation as ASCII
    rotated.save(exif_long, "JPEG", exif=_exif([(0x0112, 4, 1000, struct.pack("<I", 9999))]))  # count lies
    return {
        "image": [_image("RGB", "PNG"), _image("L", "PNG"), _image("RGBA", "PNG"), _image("P", "PNG"),
                  _image("RGB", "JPEG"), _image("L", "JPEG", progressive=True), _image("RGB", "GIF"),
                  _image("RGB", "BMP"), _image("RGB", "TIFF"), _image("RGB", "WEBP"),
                  exif_ok.getvalue(), exif_ascii.getvalue(), exif_long.getvalue()],
        "audio": [_wav(), _wav(rate=44100, channels=2), _wav(rate=48000, channels=2, fmt="FLAC", subtype="PCM_24"),
                  _wav(rate=22050, fmt="FLAC"), _wav(rate=8000, subtype="FLOAT")],
        "text": ["seven".encode(), "sieben — 七 🙂 \u200b\t tabs".encode(), "\ufeffBOM text".encode()],
        "tabular": [b'{"age": 31, "height": 1.82, "country": "FR", "device": "phone"}',
                    '{"age": "40", "country": "Côte d\'Ivoire", "device": null, "extra": [1, 2]}'.encode(),
                    b'{"height": "1,7", "device": 3.0}'],
    }


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # byte flips anywhere
        for _ in range(rng.integers(1, 17)):
            out[rng.integers(0, len(out))] = rng.integers(0, 256)
    elif kind == 1:  # truncation
        out = out[: rng.integers(0, len(out))]
    elif kind == 2:  # header lies: a 32-bit field of the first 64 bytes set to an extreme
        pos = int(rng.integers(0, max(1, min(len(out), 64) - 4)))
        out[pos:pos + 4] = struct.pack("<I", int(rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])))
    elif kind == 3:  # a slice repeated (chunks that lie about their length)
        a = int(rng.integers(0, len(out)))
        out[a:a] = out[a:a + int(rng.integers(1, 64))] * int(rng.integers(1, 4))
    else:  # flips in the metadata region (EXIF / fmt / IHDR / STREAMINFO live near the start)
        for _ in range(rng.integers(1, 9)):
            out[rng.integers(0, min(len(out), 200))] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def mutants() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(20261123)
    base = seeds()
    items = [(m, mutate(base[m][rng.integers(0, len(base[m]))], rng)) for m, n in N_MUTANTS.items() for _ in range(n)]
    lies = [("image", _png_with_size(9000, 9000)), ("image", _png_with_size(100000, 100000)),
            ("image", _png_with_size(0, 0)), ("image", _png_with_size(1 << 31 - 1, 3)),
            ("audio", _wav_lie(_wav(), rate=1)), ("audio", _wav_lie(_wav(), rate=0)), ("audio", _wav_lie(_wav(), channels=0)),
            ("audio", _wav_lie(_wav(), channels=255)), ("audio", _wav_lie(_wav(), data_size=0xFFFFFFFF)),
            ("audio", _wav_lie(_wav(), rate=4000, channels=2)), ("text", b"a" * 1_000_001), ("text", b"\xff\xfe\x00"),
            ("tabular", b"[" * 100_000), ("tabular", b'{"age": ' + b"9" * 70_000 + b"}"), ("tabular", b'{"age": 1e999}'),
            ("tabular", b'{"age": NaN, "country": {"nested": true}}')]
    return items + lies


@pytest.fixture(scope="module")
def all_mutants():
    items = mutants()
    assert len(items) >= 2000
    return items


def test_every_mutant_through_clean_ends_as_a_kept_item_or_a_reject_with_a_reason(all_mutants):
    from mmpipe.modalities import tabular

    cfg = params.CleanParams()
    cfg = cfg.model_copy(update={"tabular": tabular.Rules(**cfg.tabular.model_dump(), columns=RECORD_COLUMNS)})
    outcomes = {"kept": 0, "rejected": 0}
    for k, (modality, data) in enumerate(all_mutants):
        row = {"sample_id": f"fuzz-{k}", "source_row": k, "label": "x", "split": None, "group": None,
               "condition": None, **{f"{m}{suffix}": None for m in names() for suffix in ("", "_ref", "_error")}}
        row[modality] = data
        result = validate_sample(row, cfg)  # must not raise, whatever the bytes
        if result["row"] is not None and result["row"][f"{modality}_available"]:
            outcomes["kept"] += 1
            continue
        outcomes["rejected"] += 1
        mine = [r for r in result["rejects"] if r["modality"] == modality and r["action"] != "value_dropped"]
        assert len(mine) == 1 and mine[0]["code"] and mine[0]["reason"], (k, modality, result["rejects"])
        assert "\n" not in mine[0]["reason"] and "Traceback" not in mine[0]["reason"] and " at 0x" not in mine[0]["reason"]
    assert outcomes["kept"] > 300 and outcomes["rejected"] > 300  # the mutants exercise both outcomes


def test_every_mutant_through_the_bundle_predictor_is_a_prediction_input_or_an_error(all_mutants, bundle):
    predict = load_predictor(bundle["folder"])
    predictor = predict.Predictor(bundle["folder"])
    outcomes = {"features": 0, "error": 0}
    for k, (modality, data) in enumerate(all_mutants):
        value = data.decode("utf-8", "surrogateescape") if modality == "text" and k % 2 else data
        try:
            features = predictor.features(**{modality: value})
        except predict.InputError as exc:
            outcomes["error"] += 1
            assert str(exc) and "\n" not in str(exc), (k, modality)
            continue
        outcomes["features"] += 1
        assert np.isfinite(features.get("audio", np.zeros(1))).all()
    assert outcomes["features"] > 300 and outcomes["error"] > 300
    # and the stream of rows answers every one of them, in order
    results = list(predictor.predict_rows([{m: d} for m, d in all_mutants[:500]]))
    assert len(results) == 500 and all(("label" in r) != ("error" in r) for r in results)


@pytest.mark.parametrize("lie,code", [
    (lambda: _png_with_size(9000, 9000), "image_too_large"),
    (lambda: _png_with_size(100000, 100000), "image_too_large"),
    (lambda: _wav_lie(_wav(), rate=1), "audio_out_of_bounds"),
    (lambda: _wav_lie(_wav(), channels=255), "audio_out_of_bounds"),
    (lambda: _wav(seconds=31.0, rate=8000), "audio_duration_out_of_bounds"),
])
def test_header_lies_are_rejected_from_the_header_before_decoding(lie, code):
    from mmpipe.modalities import MODALITIES
    from mmpipe.modalities.portable import RejectedInput

    data = lie()
    modality = "image" if data.startswith(b"\x89PNG") else "audio"
    with pytest.raises(RejectedInput) as info:
        MODALITIES[modality].clean(data, getattr(params.CleanParams(), modality))
    assert info.value.code == code


def test_the_bundle_predictor_rejects_exactly_the_images_clean_rejects(all_mutants, bundle):
    """The predictor decodes a JPEG that clean keeps at preprocess's draft scale (one decode): on
    every image mutant it must still accept and reject what clean does."""
    from mmpipe.modalities import image

    predict = load_predictor(bundle["folder"])
    predictor = predict.Predictor(bundle["folder"])
    rules = params.CleanParams().image
    photo = io.BytesIO()  # large enough that preprocess decodes it at 1/8 scale (the predictor's draft path)
    Image.fromarray(np.random.default_rng(7).integers(0, 255, (256, 320, 3), dtype=np.uint8)).save(photo, "JPEG")
    rng = np.random.default_rng(20261202)
    photos = [("image", mutate(photo.getvalue(), rng)) for _ in range(300)]
    disagreements = []
    for k, (modality, data) in enumerate(all_mutants + photos):
        if modality != "image":
            continue
        try:
            image.clean(data, rules)
            clean_ok = True
        except RejectedInput:
            clean_ok = False
        try:
            predictor.features(image=data)
            served_ok = True
        except predict.InputError:
            served_ok = False
        if clean_ok != served_ok:
            disagreements.append((k, clean_ok))
    assert not disagreements
