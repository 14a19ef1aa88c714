"""Modality registry. Everything about one modality lives in its own module, which satisfies the
written interface ``mmpipe.modalities.base.Modality`` (params, clean, featurizer, arrays,
corruptions, encoder factory, predictor input).

Adding a modality = one new module here + one line in ``_BUILT_IN`` + its params sections +
one entry in dvc.yaml's preprocess matrix. The registry's order is the one modality order used
everywhere (tables, model inputs, availability columns, bundle, predictor flags).
"""

from __future__ import annotations

import typing
from types import ModuleType, SimpleNamespace
from typing import Any

from mmpipe.modalities import audio, image, tabular, text
from mmpipe.modalities.base import Cleaned, Modality, fill_defaults  # noqa: F401  (Cleaned re-exported)

_BUILT_IN = (image, text, audio, tabular)
MODALITIES: dict[str, ModuleType] = {}


def register(module: ModuleType) -> None:
    """Add a modality module (checked against the interface, its optional hooks' defaults filled in)
    at the end of the order."""
    if not isinstance(module, Modality):
        missing = [name for name in typing._get_protocol_attrs(Modality) if not hasattr(module, name)]  # noqa: SLF001
        raise TypeError(f"{module.__name__} is not a modality module: it lacks {', '.join(sorted(missing))}")
    fill_defaults(module)
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


def build_encoder(modality: str, state: dict, model_params: dict[str, Any]):
    """``modality``'s encoder (a torch module) from its module's factory, its fitted state and the
    model params (a JSON-able mapping; its ``encoders.<modality>`` subsection validated here)."""
    module = MODALITIES[modality]
    section = module.PARAMS["model"](**model_params.get("encoders", {}).get(modality, {}))
    return module.build_encoder(state, section, SimpleNamespace(**model_params))


for _module in _BUILT_IN:
    register(_module)
