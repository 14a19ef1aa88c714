"""Text modality: validation and normalisation (clean)."""

from __future__ import annotations

import re
import unicodedata

import pyarrow as pa

from mmpipe.errors import RejectedInput
from mmpipe.modalities.base import Cleaned

NAME = "text"
EXTENSIONS = (".txt",)
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.string()
INFO_COLUMNS = {"chars": pa.int32()}
INLINE = True  # a manifest's text cell is the text itself
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, control/format characters removed, whitespace runs collapsed to one space."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    return _SPACES.sub(" ", text).strip()


def clean(data: bytes, cfg) -> Cleaned:
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise RejectedInput("text_not_utf8", f"text is not valid UTF-8 (byte 0x{bad} at offset {exc.start})") from None
    text = normalize(raw)
    if not text:
        raise RejectedInput("text_empty", "text is empty after normalisation")
    info = {"chars": len(text), "truncated": len(text) > cfg.max_chars}
    if info["truncated"]:
        text = text[: cfg.max_chars].rstrip()
    out = text.encode("utf-8")
    return Cleaned(out, converted=out != data, info=info)
