"""Modality registry. Everything about one modality lives in its own module.

Each module provides:
  NAME        the column name used in every table;
  EXTENSIONS  file suffixes that belong to it in the folder layout;
  INLINE      True when a manifest cell holds the content itself (text), not a path/URL;
  clean(data, cfg) -> Cleaned   validate + normalise one item, or raise RejectedInput.
Adding a modality = one new module here + its params section.
"""

from __future__ import annotations

from types import ModuleType

from mmpipe.modalities import audio, image, text
from mmpipe.modalities.base import Cleaned  # noqa: F401  (re-exported)

MODALITIES: dict[str, ModuleType] = {m.NAME: m for m in (image, text, audio)}
NAMES: tuple[str, ...] = tuple(MODALITIES)


def by_extension(suffix: str) -> str | None:
    suffix = suffix.lower()
    for name, module in MODALITIES.items():
        if suffix in module.EXTENSIONS:
            return name
    return None
