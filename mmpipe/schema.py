"""The base of every params schema: unknown keys are errors, validated values are frozen.

Its own module so that the modality modules (which declare their params sections) and
``mmpipe.params`` (which assembles the sections from the registry) can both import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_order(self, *pairs: tuple[str, str], strict: bool = False) -> None:
        """For each (low, high) field pair: ``low <= high`` (``low < high`` when ``strict``), else a
        ValueError naming both (for ``model_validator(mode="after")`` checks)."""
        for low, high in pairs:
            a, b = getattr(self, low), getattr(self, high)
            if a > b or (strict and a == b):
                raise ValueError(f"{low} ({a}) must {'be below' if strict else 'not exceed'} {high} ({b})")


class Backbone(Strict):
    """The fields of a ``model.encoders.<m>`` section whose ``arch`` may name a pretrained backbone
    (mmpipe/models/backbones.py); ``small_cnn`` is the modality's own small network."""

    arch: str = Field("small_cnn", min_length=1)
    weights: str | None = None  # local weights file; None = random initialisation of ``arch``
    freeze: Literal["none", "all"] | Annotated[int, Field(ge=0)] = "none"  # or the number of leading blocks
    lr_scale: float = Field(0.1, gt=0, le=1)  # the backbone's learning rate, relative to train.lr
    checkpointing: bool = False  # recompute trainable blocks' activations in backward (memory for compute)
    license: str | None = None  # the pretrained weights' licence, for the model card's front matter

    @model_validator(mode="after")
    def _pretrained_only(self) -> "Backbone":
        if self.arch == "small_cnn" and (self.weights is not None or self.freeze != "none" or self.checkpointing):
            raise ValueError("weights, freeze and checkpointing apply to a pretrained arch, not small_cnn")
        return self


class Embeddable(Strict):
    """A ``preprocess.<m>`` section whose modality may cache its frozen backbone's output
    (mmpipe/features/embed.py)."""

    embed: bool = False


def check_weights_folder(path: str | None, modality: str, key: str) -> None:
    """A pretrained file under ``weights/`` must sit in its modality's folder, ``weights/<modality>/``:
    each preprocess@<modality> stage depends on that folder only (dvc.yaml), so a file elsewhere in
    weights/ would leave that modality's features (embedding cache, tokenizer) stale when it changes."""
    if path is None:
        return
    parts = Path(path).parts
    if parts and parts[0] == "weights" and parts[1:2] != (modality,):
        raise ValueError(f"{key}: {path} is under weights/ but not in weights/{modality}/ — move it there "
                         f"(e.g. weights/{modality}/{Path(path).name}): DVC re-runs a modality's stages when its own "
                         f"weights folder changes")
