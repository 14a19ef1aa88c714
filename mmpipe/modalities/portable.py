"""Raw input -> what clean and preprocess make of it, with nothing but the standard library, numpy,
Pillow, soundfile and soxr: the one implementation used by the pipeline **and** shipped as is in
the deployment bundle (next to logmel.py and tokenizer.py), so the standalone predictor turns a
user's raw file into the features the model was trained on, under the same rules.

Every raw item goes through ``decode_image`` / ``decode_audio`` / ``decode_text`` (clean, and the
predictor for each request). They are the single place where hostile input is met:

- sizes are checked from the header before anything is decoded (pixels and sides; audio rate,
  channels and declared duration), and audio is read block by block, so a file whose header lies
  still cannot decode into more than ``max_seconds`` of mono samples;
- any exception raised while decoding or normalising one item becomes ``RejectedInput`` (a short
  ``code`` and a one-line ``message``): one bad file never ends a stage or a request.

The rules (``rules``) are plain mappings: clean's params sections ``clean.image``, ``clean.audio``,
``clean.text``. clean records them in ``data/clean/dataset.json`` and the bundle ships them in
``manifest.json`` (``clean``), so the predictor rejects exactly what clean rejects.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import warnings
from typing import Any, Mapping

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, UnidentifiedImageError

_SPACES = re.compile(r"\s+")
_OBJECT_REPR = re.compile(r"<[\w.]+ object( at 0x[0-9a-fA-F]+)?>")  # "<_io.BytesIO object at 0x7f..>" in messages
PASS_THROUGH_FORMATS = {"PNG", "JPEG"}  # image formats clean keeps as they are (when already 8-bit L/RGB)
# What Image.open may try: the common photo/scan formats. Pillow knows ~40 formats; each extra parser
# is attack surface and none of the others is what users' data sets hold.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
AUDIO_BLOCK_FRAMES = 65536  # frames decoded at a time (then mixed down to mono)
# read past what the model hears, so that the resampler's output up to there is what the whole clip's
# is, bit for bit (soxr HQ at 4 kHz..384 kHz -> 16 kHz: equal from 0.1 s on, measured)
RESAMPLE_MARGIN_S = 0.5
RESAMPLE_QUALITY = "HQ"  # soxr quality of every resampling, pipeline and predictor alike


class RejectedInput(Exception):
    """One modality of one sample is unusable. ``code``: a short category counted in metrics;
    ``message``: one line for a person saying why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def describe(exc: BaseException) -> str:
    """An exception as one short line (some libraries raise with an empty or multi-line message)."""
    text = " ".join(_OBJECT_REPR.sub("", str(exc)).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


MAX_INT_DIGITS = 4000  # Python refuses to parse longer integers (int_max_str_digits, 4300)


def json_int(digits: str) -> int | float:
    """A JSON integer; one too long for Python's int parser becomes a float (infinite): a cell that
    typing reports as not finite, not a file that cannot be read."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def printable(value: object) -> str:
    """Text for messages and stored names: invalid UTF-8 (kept as surrogates) shown as escapes."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def json_object(text: str | bytes) -> dict:
    """``text`` as a JSON object; ValueError with a one-line reason otherwise (a manifest's JSON line,
    a ``--tabular`` argument, a record)."""
    try:
        value = json.loads(text, parse_int=json_int)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # invalid UTF-8 bytes, absurd nesting
        raise ValueError(f"not valid JSON ({describe(exc)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- image


def to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit 'L' or 'RGB' (transparency composited on white)."""
    if img.mode in ("L", "RGB"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit (and 32-bit int holding 16-bit data) scale by 257; floats are assumed 0..1 or 0..255.
        if img.mode == "F":
            scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0 if arr.max(initial=0.0) > 255 else 1.0
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8))  # 2-D -> L
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba)
        return flat.convert("L" if img.mode in ("LA", "La") else "RGB")
    return img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...


# EXIF orientation -> the transpose that displays the image upright (the table of ImageOps.exif_transpose)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                 8: Image.Transpose.ROTATE_90}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable: a broken EXIF block does not make
    the pixels unusable, so it is ignored, as image viewers do."""
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # corrupt EXIF raises anything from struct.error to TypeError
        return 1
    return value if isinstance(value, int) and value in _ORIENTATIONS else 1


def orient(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply a recorded EXIF rotation/flip; -> (image, whether it was rotated)."""
    method = _ORIENTATIONS.get(orientation(img))
    return (img.transpose(method), True) if method is not None else (img, False)


def normalize_image(img: Image.Image) -> tuple[Image.Image, bool]:
    """clean's normalisation: EXIF orientation applied, 8-bit L/RGB. -> (image, whether it changed)."""
    oriented, rotated = orient(img)
    normalized = to_8bit(oriented)
    return normalized, rotated or normalized is not img


def decode_image(data: bytes, rules: Mapping[str, Any], draft: tuple[str, int] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """Encoded image -> (normalised image, facts), under ``rules`` (clean.image: min_side, max_side,
    max_pixels). The size is checked from the header, before any pixel is decoded.

    ``draft`` (mode, size): the predictor's single decode. A JPEG that clean would keep as it is
    (8-bit L/RGB, upright) is then decoded at the reduced DCT scale preprocess decodes it at
    (``load_pixels``), so the image returned is the one preprocess starts from, not a full-size one
    decoded again after."""
    if not data:
        raise RejectedInput("image_decode_error", "image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about damaged metadata; the pixels decide
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = img.size
            if width * height > rules["max_pixels"]:
                raise RejectedInput("image_too_large",
                                    f"image is {width}x{height} > clean.image.max_pixels={rules['max_pixels']}")
            if min(width, height) < rules["min_side"] or max(width, height) > rules["max_side"]:
                raise RejectedInput("image_size_out_of_bounds", f"image is {width}x{height}; sides must be within "
                                    f"[{rules['min_side']}, {rules['max_side']}] (clean.image)")
            fmt, original_mode = img.format, img.mode
            if draft is not None and fmt == "JPEG" and img.mode in ("L", "RGB") and orientation(img) == 1:
                img.draft("L" if draft[0] == "grayscale" else "RGB", (draft[1], draft[1]))
            img.load()  # the decode: truncated or corrupt files fail here
            normalized, changed = normalize_image(img)
    except RejectedInput:
        raise
    except UnidentifiedImageError:
        raise RejectedInput("image_decode_error", "not a readable image (unknown or corrupt format; accepted: "
                            + ", ".join(IMAGE_FORMATS) + ")") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedInput("image_too_large", f"image too large to decode safely: {exc}") from None
    except Exception as exc:  # any decoder failure is this item's problem, never the caller's
        raise RejectedInput("image_decode_error", f"image does not decode: {describe(exc)}") from None
    return normalized, {"width": normalized.width, "height": normalized.height, "mode": normalized.mode,
                        "format": fmt, "original_mode": original_mode, "changed": changed}


def to_square(img: Image.Image, size: int, fit: str) -> Image.Image:
    """Resize keeping the aspect ratio, then pad (centred, black) or centre-crop to size x size."""
    if img.size == (size, size):
        return img
    width, height = img.size
    scale = size / (max(width, height) if fit == "pad" else min(width, height))
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = img.resize(new, Image.Resampling.BILINEAR)
    if new == (size, size):
        return img
    if fit == "crop":
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        return img.crop((left, top, left + size, top + size))
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


def load_pixels(data: bytes | Image.Image, size: int, mode: str, fit: str) -> np.ndarray:
    """Clean image (encoded, or decoded by decode_image) -> (C, size, size) uint8 with Pillow; the
    deployment predictor runs this function."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged metadata of a file decode_image accepted
        img = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
        target = "L" if mode == "grayscale" else "RGB"
        img.draft(target, (size, size))  # JPEG: decode at reduced scale when larger
        img = to_square(img if img.mode == target else img.convert(target), size, fit)  # (convert copies even when equal)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


# --------------------------------------------------------------------------- text


def normalize(text: str) -> str:
    """NFC, control/format characters removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    return _SPACES.sub(" ", text).strip()


def decode_text(data: bytes | str, rules: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """UTF-8 bytes (or a str) -> (normalised text cut to max_chars, facts), under ``rules``
    (clean.text: max_bytes, max_chars)."""
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > rules["max_bytes"]:
        raise RejectedInput("text_too_large", f"text is {size:,} bytes > clean.text.max_bytes={rules['max_bytes']:,}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            bad = data[exc.start:exc.start + 1].hex()
            raise RejectedInput("text_not_utf8",
                                f"text is not valid UTF-8 (byte 0x{bad} at offset {exc.start})") from None
    text = normalize(data)
    if not text:
        raise RejectedInput("text_empty", "text is empty after normalisation")
    facts = {"chars": len(text), "truncated": len(text) > rules["max_chars"]}
    return text[: rules["max_chars"]].rstrip(), facts


# --------------------------------------------------------------------------- audio


def decode_audio(data: bytes, rules: Mapping[str, Any], keep_seconds: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Encoded audio -> (mono float32 at ``rules["sample_rate"]``, facts), under ``rules``
    (clean.audio: sample_rate, min/max_seconds, min/max_rate, max_channels, silence_dbfs).

    Rate and channels are checked from the header, and the declared duration when the header has
    one; then the file is decoded a block at a time and mixed down to mono, stopping as soon as it
    exceeds ``max_seconds`` — a header that lies cannot make it decode more. One resampler (soxr)
    for the pipeline and the predictor.

    ``keep_seconds`` (the predictor: what the model hears): when the header declares the duration
    (already checked), decoding stops a little past it and silence and non-finite samples are judged
    on that part; the samples returned up to ``keep_seconds`` are the whole clip's, bit for bit.
    Without a declared duration the rest is still read (not kept), to reject a clip that is too long.
    """
    if not data:
        raise RejectedInput("audio_empty", "audio file is empty (0 bytes)")
    target = rules["sample_rate"]
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, declared = f.samplerate, f.channels, f.frames
            facts = {"original_rate": rate, "original_channels": channels, "original_format": f"{f.format}/{f.subtype}"}
            if not 1 <= channels <= rules["max_channels"]:
                raise RejectedInput("audio_out_of_bounds",
                                    f"audio has {channels} channels > clean.audio.max_channels={rules['max_channels']}")
            if not rules["min_rate"] <= rate <= rules["max_rate"]:
                raise RejectedInput("audio_out_of_bounds", f"audio sample rate {rate} Hz is outside "
                                    f"[{rules['min_rate']}, {rules['max_rate']}] Hz (clean.audio.min_rate/max_rate)")
            max_frames = int(rules["max_seconds"] * rate)
            known = 0 < declared < 2**62  # libsndfile's "unknown length" is huge
            if known and declared > max_frames:
                raise _too_long(declared / rate, rules)
            keep_frames = max_frames if keep_seconds is None else int((keep_seconds + RESAMPLE_MARGIN_S) * rate) + 1
            parts, frames = [], 0
            for block in f.blocks(blocksize=AUDIO_BLOCK_FRAMES, dtype="float32", always_2d=True):
                frames += len(block)
                if frames > max_frames:
                    raise _too_long(frames / rate, rules, at_least=True)
                if frames - len(block) >= keep_frames:
                    continue  # past what is kept: only counted
                if not np.isfinite(block).all():
                    raise RejectedInput("audio_nonfinite", "audio contains NaN or infinite samples")
                parts.append(block.mean(axis=1))
                if known and frames >= keep_frames:
                    break  # the duration is the header's, already checked
    except RejectedInput:
        raise
    except Exception as exc:  # any decoder failure is this item's problem, never the caller's
        raise RejectedInput("audio_decode_error", f"audio does not decode: {describe(exc)}") from None
    if frames == 0:
        raise RejectedInput("audio_empty", "audio has no samples")
    seconds = (declared if known and frames < declared else frames) / rate
    if seconds < rules["min_seconds"]:
        raise RejectedInput("audio_duration_out_of_bounds", f"audio lasts {seconds:.3f}s; must be within "
                            f"[{rules['min_seconds']}, {rules['max_seconds']}]s (clean.audio)")
    mono = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if rate != target:
        mono = soxr.resample(mono, rate, target, quality=RESAMPLE_QUALITY)
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
    judged = mono if keep_seconds is None else mono[:round(keep_seconds * target)]
    rms = float(np.sqrt(np.mean(np.square(judged, dtype=np.float64))))
    dbfs = 20.0 * np.log10(rms) if rms > 0 else -np.inf
    if dbfs < rules["silence_dbfs"]:
        part = "" if keep_seconds is None or len(judged) == len(mono) else f" in the first {keep_seconds:g}s the model hears"
        raise RejectedInput("audio_silent",
                            f"audio is silent{part} (RMS {dbfs:.1f} dBFS < clean.audio.silence_dbfs={rules['silence_dbfs']})")
    return mono, facts | {"seconds": round(seconds, 6)}


def _too_long(seconds: float, rules: Mapping[str, Any], at_least: bool = False) -> RejectedInput:
    return RejectedInput("audio_duration_out_of_bounds", f"audio lasts {'more than ' if at_least else ''}{seconds:.3f}s; "
                         f"must be within [{rules['min_seconds']}, {rules['max_seconds']}]s (clean.audio)")


def to_pcm16(mono: np.ndarray) -> np.ndarray:
    """Float samples -> the 16-bit PCM clean stores: floor(x * 32768), clipped (libsndfile's own
    float -> PCM_16 conversion, so converted clips keep their bytes). Written here, not left to the
    library, so that the predictor reproduces clean's samples exactly whatever its libsndfile version."""
    return np.clip(np.floor(mono.astype(np.float32) * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def as_pcm16(mono: np.ndarray) -> np.ndarray:
    """The float samples clean's PCM16 WAV decodes back to (what preprocess reads)."""
    return to_pcm16(mono).astype(np.float32) / 32768.0


def fix_length(clip: np.ndarray, n_samples: int) -> np.ndarray:
    """Cut or zero-pad the end to ``n_samples`` (librosa.util.fix_length)."""
    out = np.zeros(n_samples, np.float32)
    out[:min(len(clip), n_samples)] = clip[:n_samples]
    return out
