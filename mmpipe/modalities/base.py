"""Types shared by the modality modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cleaned:
    data: bytes  # normalised, encoded content (PNG/JPEG, WAV PCM16 mono, UTF-8 text)
    converted: bool = False  # True when the content had to be re-encoded
    info: dict[str, Any] = field(default_factory=dict)

