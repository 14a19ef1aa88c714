"""Types shared by the modality modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmpipe.errors import PipelineError


@dataclass
class Cleaned:
    data: bytes  # normalised, encoded content (PNG/JPEG, WAV PCM16 mono, UTF-8 text)
    converted: bool = False  # True when the content had to be re-encoded
    info: dict[str, Any] = field(default_factory=dict)


def item_failed(errors: dict[int, str] | None, position: int, sample_id: str, reason: str) -> None:
    """A featurizer could not turn one item into features: record ``reason`` in ``errors`` (position ->
    reason; the caller marks the item unavailable and lists it) or, without ``errors``, stop the
    caller with one line naming the sample."""
    if errors is None:
        raise PipelineError(f"sample {sample_id}: {reason}")
    errors[position] = reason
