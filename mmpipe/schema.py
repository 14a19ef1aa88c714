"""The base of every params schema: unknown keys are errors, validated values are frozen.

Its own module so that the modality modules (which declare their params sections) and
``mmpipe.params`` (which assembles the sections from the registry) can both import it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def check_order(self, *pairs: tuple[str, str], strict: bool = False) -> None:
        """For each (low, high) field pair: ``low <= high`` (``low < high`` when ``strict``), else a
        ValueError naming both (for ``model_validator(mode="after")`` checks)."""
        for low, high in pairs:
            a, b = getattr(self, low), getattr(self, high)
            if a > b or (strict and a == b):
                raise ValueError(f"{low} ({a}) must {'be below' if strict else 'not exceed'} {high} ({b})")
