"""Image modality: validation and normalisation (clean)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from mmpipe.errors import RejectedInput
from mmpipe.modalities.base import Cleaned

NAME = "image"
EXTENSIONS = (".png", ".jpg", ".jpeg")
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.binary()
INFO_COLUMNS = {"width": pa.int32(), "height": pa.int32()}
INLINE = False
PASS_THROUGH_FORMATS = {"PNG", "JPEG"}


def _to_8bit(img: Image.Image) -> Image.Image:
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


def clean(data: bytes, cfg) -> Cleaned:
    """Decode fully, check size bounds, convert to 8-bit L/RGB; re-encode as PNG only when needed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            width, height = img.size
            if width * height > cfg.max_pixels:
                raise RejectedInput("image_too_large", f"image is {width}x{height} > clean.image.max_pixels={cfg.max_pixels}")
            img.load()  # full decode: truncated or corrupt files fail here
    except RejectedInput:
        raise
    except UnidentifiedImageError:
        raise RejectedInput("image_decode_error", "not a readable image (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedInput("image_too_large", f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedInput("image_decode_error", f"image does not decode: {exc}") from None
    if min(width, height) < cfg.min_side or max(width, height) > cfg.max_side:
        raise RejectedInput(
            "image_size_out_of_bounds",
            f"image is {width}x{height}; sides must be within [{cfg.min_side}, {cfg.max_side}] (clean.image)",
        )
    original_mode = img.mode
    # exif_transpose always copies; only call it when a rotation/flip is actually recorded.
    rotated = img.getexif().get(ExifTags.Base.Orientation, 1) not in (1, None)
    oriented = ImageOps.exif_transpose(img) if rotated else img
    normalized = _to_8bit(oriented)
    needs_encode = fmt not in PASS_THROUGH_FORMATS or rotated or normalized is not img
    info = {"width": normalized.width, "height": normalized.height, "mode": normalized.mode,
            "format": fmt, "original_mode": original_mode}
    if not needs_encode:
        return Cleaned(data, converted=False, info=info)
    out = io.BytesIO()
    normalized.save(out, format="PNG")
    return Cleaned(out.getvalue(), converted=True, info=info)
