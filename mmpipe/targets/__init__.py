"""Target registry: what the model predicts, one module per type (``mmpipe.targets.base.Target``):
``category`` (one class: the default), ``number`` (regression), ``set`` (tags, multi-label).

``data.target`` declares the type and its options; collect records the declaration beside the raw data,
clean parses every cell with the type and fits its state on the train split (``dataset.json``:
``target``), and every later stage rebuilds the fitted target from there (``target_of``). Adding a type
is one module and one line below.
"""

from __future__ import annotations

from typing import Any

from mmpipe.targets.base import UNLABELLED, BadTarget, Target  # noqa: F401  (re-exported)
from mmpipe.targets.category import Category
from mmpipe.targets.number import Number
from mmpipe.targets.tagset import TagSet

TYPES: dict[str, type[Target]] = {t.NAME: t for t in (Category, Number, TagSet)}
DEFAULT = {"type": "category", "column": "label"}


def target_of(spec: dict[str, Any] | None) -> Target:
    """The target ``spec`` describes (data.target as declared, with its fitted ``state`` once clean ran);
    None: the default, one class per sample from the ``label`` column."""
    spec = dict(spec or DEFAULT)
    return TYPES[spec["type"]](spec)
