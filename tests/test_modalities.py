"""Clean rules of each modality, on real PNG/JPEG/WAV/FLAC bytes."""

from __future__ import annotations

import ast
import io
import re
import tokenize
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import png_bytes, tone, wav_bytes
from mmpipe.modalities.portable import RejectedInput
from mmpipe.modalities import MODALITIES, audio, image, names, register, text
from mmpipe.modalities.base import Featurizer, Modality, model_dtype
from mmpipe.schema import Strict

IMG = image.Clean()
AUD = audio.Clean()
TXT = text.Clean()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------- image


def test_rgb_png_passes_through_unchanged():
    data = png_bytes("RGB")
    out = image.clean(data, IMG)
    assert out.data == data and not out.converted
    assert out.info["width"] == 24 and out.info["height"] == 20


@pytest.mark.parametrize("mode,fmt,expected", [
    ("L", "JPEG", "L"), ("RGB", "JPEG", "RGB"),  # pass-through formats
    ("RGBA", "PNG", "RGB"), ("LA", "PNG", "L"), ("P", "PNG", "RGB"), ("1", "PNG", "L"),
    ("CMYK", "JPEG", "RGB"), ("I;16", "PNG", "L"), ("RGB", "BMP", "RGB"), ("RGB", "GIF", "RGB"),
])
def test_unusual_but_valid_images_are_converted_and_kept(mode, fmt, expected):
    out = image.clean(png_bytes(mode, fmt=fmt), IMG)
    img = decoded(out.data)
    assert img.mode == expected and img.size == (24, 20)
    assert img.format in ("PNG", "JPEG")


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((10, 10), 65535, np.uint16)
    arr[:5] = 257 * 100
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # uint16 -> I;16
    pixels = np.asarray(decoded(image.clean(buf.getvalue(), IMG).data))
    assert pixels[0, 0] == 100 and pixels[9, 9] == 255


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    pixels = np.asarray(decoded(image.clean(buf.getvalue(), IMG).data))
    assert (pixels == 255).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    out = image.clean(buf.getvalue(), IMG)
    assert out.converted and decoded(out.data).size == (10, 30)


def test_truncated_png_is_rejected():
    data = png_bytes("RGB", size=(64, 64))
    with pytest.raises(RejectedInput) as info:
        image.clean(data[: len(data) // 2], IMG)
    assert info.value.code == "image_decode_error"


def test_random_bytes_are_not_an_image():
    with pytest.raises(RejectedInput, match="not a readable image"):
        image.clean(b"\x00\x01garbage" * 10, IMG)


def test_size_bounds():
    with pytest.raises(RejectedInput) as info:
        image.clean(png_bytes("RGB", size=(4, 40)), IMG)
    assert info.value.code == "image_size_out_of_bounds" and "4x40" in info.value.message
    with pytest.raises(RejectedInput) as info:
        image.clean(png_bytes("RGB", size=(100, 100)), image.Clean(max_pixels=5000))
    assert info.value.code == "image_too_large"


# ---------------------------------------------------------------- audio


def read(data: bytes):
    return sf.read(io.BytesIO(data), dtype="float32")


def test_mono_pcm16_at_target_rate_passes_through():
    data = wav_bytes()
    out = audio.clean(data, AUD)
    assert out.data == data and not out.converted and out.info["seconds"] == 0.5


@pytest.mark.parametrize("fmt,subtype,rate,channels", [
    ("WAV", "PCM_U8", 16000, 1), ("WAV", "PCM_24", 16000, 1), ("WAV", "FLOAT", 16000, 1),
    ("WAV", "PCM_16", 44100, 2), ("FLAC", "PCM_16", 22050, 1), ("FLAC", "PCM_24", 48000, 2),
])
def test_other_encodings_become_mono_pcm16_at_target_rate(fmt, subtype, rate, channels):
    data = wav_bytes(tone(seconds=0.5, rate=rate, channels=channels), rate=rate, fmt=fmt, subtype=subtype)
    out = audio.clean(data, AUD)
    info = sf.info(io.BytesIO(out.data))
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, 16000)
    samples, _ = read(out.data)
    assert abs(len(samples) - 8000) <= 2
    assert 0.3 < np.abs(samples).max() < 0.6  # the 0.5-amplitude tone survives conversion


def test_stereo_is_averaged():
    left_right = np.stack([tone(amplitude=0.4), np.zeros(8000, np.float32)], axis=1)
    samples, _ = read(audio.clean(wav_bytes(left_right), AUD).data)
    assert abs(np.abs(samples).max() - 0.2) < 0.01


@pytest.mark.parametrize("data,code", [
    (b"", "audio_empty"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "audio_decode_error"),
    (wav_bytes(np.zeros(8000, np.float32)), "audio_silent"),
    (wav_bytes(tone(seconds=0.01)), "audio_duration_out_of_bounds"),
    (wav_bytes(tone(seconds=31.0, rate=8000), rate=8000), "audio_duration_out_of_bounds"),
])
def test_bad_audio_is_rejected(data, code):
    with pytest.raises(RejectedInput) as info:
        audio.clean(data, AUD)
    assert info.value.code == code


def test_nan_audio_is_rejected():
    samples = tone()
    samples[100] = np.nan
    with pytest.raises(RejectedInput) as info:
        audio.clean(wav_bytes(samples, subtype="FLOAT"), AUD)
    assert info.value.code == "audio_nonfinite"


def test_header_only_wav_has_no_samples():
    with pytest.raises(RejectedInput) as info:
        audio.clean(wav_bytes(np.zeros(0, np.float32)), AUD)
    assert info.value.code in ("audio_empty", "audio_decode_error")


# ---------------------------------------------------------------- text


def test_text_is_nfc_normalised_and_control_chars_removed():
    out = text.clean("  Cafe\u0301\x00 au\tlait\u200b\n ".encode(), TXT)
    assert out.data.decode() == "Caf\u00e9 au lait" and out.converted


def test_plain_text_passes_through():
    out = text.clean(b"seven", TXT)
    assert out.data == b"seven" and not out.converted


def test_utf8_bom_is_dropped():
    assert text.clean("\ufeffnine".encode("utf-8"), TXT).data == b"nine"


def test_non_utf8_is_rejected_with_offset():
    with pytest.raises(RejectedInput) as info:
        text.clean("caf\u00e9".encode("latin-1"), TXT)
    assert info.value.code == "text_not_utf8" and "0xe9 at offset 3" in info.value.message


@pytest.mark.parametrize("raw", [b"", b"   ", b"\x00\x01\n\t"])
def test_empty_text_is_rejected(raw):
    with pytest.raises(RejectedInput) as info:
        text.clean(raw, TXT)
    assert info.value.code == "text_empty"


def test_long_text_is_truncated():
    out = text.clean(b"a" * 50, text.Clean(max_chars=10))
    assert out.data == b"a" * 10 and out.info["truncated"]


# --------------------------------------------------------------------------- the seam


@pytest.mark.parametrize("name", names())
def test_every_registered_module_satisfies_the_modality_interface(name):
    module = MODALITIES[name]
    assert isinstance(module, Modality) and module.NAME == name
    assert set(module.PARAMS) <= {"data", "clean", "preprocess", "model"} and {"clean", "preprocess", "model"} <= set(module.PARAMS)
    for schema in module.PARAMS.values():
        assert issubclass(schema, Strict)
        schema()  # every field has a default: a new modality never breaks an existing params.yaml
    rules = module.PARAMS["clean"]()
    # rules decided over the raw items (a record's column types; the rules as they are by default)
    rules = module.resolve_rules(rules, {}, iter([b'{"age": 31, "country": "FR"}', b'{"age": "40"}']))
    dataset = {"labels": ["a", "b"], "clean_rules": {name: rules.model_dump(mode="json")}}
    # settings left to auto resolve from the train split's facts (clean's INFO_COLUMNS) before featurizing
    cfg, choices = module.resolve_preprocess(module.PARAMS["preprocess"](), None,
                                             {key: np.array([24, 40, 32]) for key in module.INFO_COLUMNS})
    assert all(set(choice) == {"value", "why"} for choice in choices.values())
    features = module.Features(cfg, dataset)
    assert isinstance(features, Featurizer)
    assert features.arrays and all(isinstance(shape, tuple) for shape, _ in features.arrays.values())
    for _, dtype in features.arrays.values():
        assert model_dtype(dtype) in (np.uint8, np.bool_, np.int64, np.float32)
    assert module.CORRUPTIONS and all(callable(f) for f in module.CORRUPTIONS.values())
    code, cls = module.PREDICTOR_INPUT
    assert Path(code).is_file() and re.search(rf"^class {cls}\b", Path(code).read_text(), re.M)
    line = module.describe_rules(dataset["clean_rules"][name])
    assert isinstance(line, str) and line and "\n" not in line


def test_registering_a_module_checks_the_interface():
    incomplete = types.ModuleType("half_a_modality")
    incomplete.NAME = "half"
    with pytest.raises(TypeError, match="half_a_modality is not a modality module: it lacks CORRUPTIONS"):
        register(incomplete)
    assert "half" not in MODALITIES


# the built-in corpus generator is a dataset of particular modalities: it names its own columns
# the built-in corpus generates each modality; pyproject.toml's extra for pretrained text models is named [text]
NAMING_ALLOWED = {"mmpipe/data/builtin.py", "mmpipe/data/tts.py", "mmpipe/extras.py", "mmpipe/cli.py"}


def test_no_module_outside_modalities_names_a_modality():
    """Everything outside mmpipe/modalities/ derives modalities from the registry: no string literal
    there is a modality's name (or a flag / column made of it)."""
    root = Path(__file__).resolve().parents[1]
    words = set(names())
    offenders = []
    for path in sorted([*(root / "mmpipe").rglob("*.py"), *(root / "stages").glob("*.py")]):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("mmpipe/modalities/") or rel in NAMING_ALLOWED:
            continue
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type != tokenize.STRING:
                continue
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):  # f-strings: their literal parts
                value = token.string
            value = value if isinstance(value, str) else ""
            parts = set(re.split(r"[^a-z]+", value)) if len(value) < 40 else set()
            if value in words or value.lstrip("-") in words or (parts & words and re.fullmatch(r"[a-z_\-{}\[\]\"' .]*", value)):
                offenders.append(f"{rel}:{token.start[0]}: {token.string}")
    assert not offenders, "\n".join(offenders)
