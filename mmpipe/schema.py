"""The base of every params schema: unknown keys are errors, validated values are frozen.

Its own module so that the modality modules (which declare their params sections) and
``mmpipe.params`` (which assembles the sections from the registry) can both import it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
