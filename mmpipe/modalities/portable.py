"""Raw input -> what clean and preprocess make of it, with nothing but the standard library, numpy
and Pillow: the one implementation used by the pipeline **and** shipped as is in the deployment
bundle (next to logmel.py and tokenizer.py), so the standalone predictor turns a user's raw file
into the features the model was trained on.

Audio decoding needs soundfile, which the predictor has too; only resampling differs: the pipeline
uses soxr (high quality, compiled), the predictor ``resample`` below (numpy FFT, band-limited).
"""

from __future__ import annotations

import io
import re
import unicodedata

import numpy as np
from PIL import ExifTags, Image, ImageOps

_SPACES = re.compile(r"\s+")
PASS_THROUGH_FORMATS = {"PNG", "JPEG"}  # image formats clean keeps as they are (when already 8-bit L/RGB)


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
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8))  # uint8 2-D -> L
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(background, rgba)
        return flat.convert("L" if img.mode in ("LA", "La") else "RGB")
    return img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...


def normalize_image(img: Image.Image) -> tuple[Image.Image, bool]:
    """clean's normalisation: EXIF orientation applied, 8-bit L/RGB. -> (image, whether it changed)."""
    oriented, rotated = orient(img)
    normalized = to_8bit(oriented)
    return normalized, rotated or normalized is not img


def orient(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply a recorded EXIF rotation/flip; -> (image, whether it was rotated)."""
    # exif_transpose always copies; only call it when a rotation/flip is actually recorded.
    rotated = img.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)
    return (ImageOps.exif_transpose(img) if rotated else img), rotated


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
    """Encoded image -> (C, size, size) uint8 with Pillow; the deployment predictor runs this function."""
    img = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
    img.draft("L" if mode == "grayscale" else "RGB", (size, size))  # JPEG: decode at reduced scale when larger
    img = to_square(img.convert("L" if mode == "grayscale" else "RGB"), size, fit)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)




# --------------------------------------------------------------------------- text


def normalize(text: str) -> str:
    """NFC, control/format characters removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    return _SPACES.sub(" ", text).strip()


# --------------------------------------------------------------------------- audio


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono clip by zero-padding/truncating its spectrum (numpy only)."""
    if rate == target_rate or len(samples) == 0:
        return samples.astype(np.float32)
    n_out = int(round(len(samples) * target_rate / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), n_out // 2 + 1)
    resized = np.zeros(n_out // 2 + 1, np.complex128)
    resized[:keep] = spectrum[:keep]
    return (np.fft.irfft(resized, n_out) * (n_out / len(samples))).astype(np.float32)


def fix_length(clip: np.ndarray, n_samples: int) -> np.ndarray:
    """Cut or zero-pad the end to ``n_samples`` (librosa.util.fix_length)."""
    out = np.zeros(n_samples, np.float32)
    out[:min(len(clip), n_samples)] = clip[:n_samples]
    return out
