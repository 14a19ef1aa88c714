"""Modality registry. Everything about one modality lives in its own module, which satisfies the
written interface ``mmpipe.modalities.base.Modality`` (params, clean, featurizer, arrays,
corruptions, encoder factory, predictor input).

Adding a modality = one new module here + one line in ``_BUILT_IN`` + its params sections +
one entry in dvc.yaml's preprocess matrix. The registry's order is the one modality order used
everywhere (tables, model inputs, availability columns, bundle, predictor flags).
"""

from __future__ import annotations

import typing
from types import ModuleType

from mmpipe.modalities import audio, image, tabular, text
from mmpipe.modalities.base import Cleaned, Modality  # noqa: F401  (re-exported)

_BUILT_IN = (image, text, audio, tabular)
MODALITIES: dict[str, ModuleType] = {}


def register(module: ModuleType) -> None:
    """Add a modality module (checked against the interface) at the end of the order."""
    if not isinstance(module, Modality):
        missing = [name for name in typing._get_protocol_attrs(Modality) if not hasattr(module, name)]  # noqa: SLF001
        raise TypeError(f"{module.__name__} is not a modality module: it lacks {', '.join(sorted(missing))}")
    MODALITIES[module.NAME] = module


def unregister(name: str) -> None:
    MODALITIES.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered modalities, in the one order used everywhere."""
    return tuple(MODALITIES)


def by_extension(suffix: str) -> str | None:
    suffix = suffix.lower()
    for name, module in MODALITIES.items():
        if suffix in module.EXTENSIONS:
            return name
    return None


for _module in _BUILT_IN:
    register(_module)
