"""The written interface of a modality module, and the types the modules share.

A modality is one module under ``mmpipe/modalities/`` registered in ``mmpipe/modalities/__init__.py``.
It satisfies :class:`Modality` (module attributes; ``tests/test_modalities.py`` checks every
registered module against it) and its ``Features`` class satisfies :class:`Featurizer`. Everything
else — params schema, model, ONNX input contract, compress, evaluate, bundle, predictor, pyfunc —
is derived from these attributes; no module outside ``mmpipe/modalities/`` names a modality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import numpy as np


@dataclass
class Cleaned:
    data: bytes  # normalised, encoded content (PNG/JPEG, WAV PCM16 mono, UTF-8 text, JSON)
    converted: bool = False  # True when the content had to be re-encoded
    info: dict[str, Any] = field(default_factory=dict)
    # parts of the item dropped while keeping the rest (a record's bad cells): (code, reason) each,
    # listed in clean's rejects with action ``value_dropped``
    dropped: list[tuple[str, str]] = field(default_factory=list)


@runtime_checkable
class Featurizer(Protocol):
    """Clean items of one modality -> fixed-shape arrays (preprocess, evaluate's sweep).

    Constructed as ``Features(cfg, dataset)`` from the modality's ``preprocess.<name>`` params and
    clean's ``dataset.json``; fitted on the train split only; its state is JSON (``state()``) plus
    the files it names (``state_files``), from which ``from_state`` rebuilds it.
    """

    arrays: dict[str, tuple[tuple[int, ...], Any]]
    """Array name -> (shape without the batch axis, stored numpy dtype). The names are the model's
    and the ONNX graph's inputs, in this order; the encoder takes them positionally in this order."""
    stats: tuple[str, tuple[int, ...], float] | None
    """(array, axes reduced, scale) of the train mean/std preprocess computes, or None."""
    gpu: ClassVar[bool]
    """True when ``transform`` can use the device it is given."""

    fit: Callable[[list], None] | None
    """Fit state (vocabulary, statistics) on the clean values of the train split's available items;
    optional (None: the featurizer has nothing to fit)."""

    def transform(self, items: list, ids: list[str], noise: Callable | None = None, *,
                  errors: dict[int, str], device: str = "cpu") -> dict[str, np.ndarray]:
        """Clean items (None = unavailable) -> one array per ``arrays`` entry, with a batch axis.
        ``noise`` maps the decoded signal of the present items (evaluate's corruptions). An item that
        cannot be featurized is recorded in ``errors`` (position -> reason), never raised."""

    def state(self) -> dict:
        """JSON-able fitted state (stored in state.json, shipped in the bundle's manifest)."""

    def save(self, folder: Path) -> None:
        """Write the files ``state_files`` names into ``folder``."""

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> "Featurizer":
        """The fitted featurizer back from a preprocess output folder."""

    @staticmethod
    def state_files(state: dict) -> list[str]:
        """The files of ``folder`` the state refers to (copied into the deployment bundle)."""


@runtime_checkable
class Modality(Protocol):
    """What a modality module provides (as module attributes)."""

    NAME: str
    """The column name in every table, the params subsection name, the predictor's flag."""
    EXTENSIONS: tuple[str, ...]
    """File suffixes of this modality in the folder layout ``<label>/<stem>.<ext>``."""
    INLINE: bool
    """True when a manifest cell holds the content itself (text), not a path or URL."""
    STORED_AS: Any
    """pyarrow type of the clean column (binary or string)."""
    INFO_COLUMNS: dict[str, Any]
    """Facts of ``clean``'s info kept as ``<name>_<fact>`` columns, with their pyarrow types."""
    PARAMS: dict[str, type]
    """Section -> schema (a ``mmpipe.schema.Strict``) of this modality's params: ``clean``,
    ``preprocess`` (subsection ``<section>.<name>``), ``model`` (subsection ``model.encoders.<name>``),
    optionally ``data`` (``data.<name>``)."""
    Features: type
    """The featurizer class (:class:`Featurizer`)."""
    CORRUPTIONS: dict[str, Callable]
    """Name -> ``f(decoded items, level in 0..1, rng)`` for the robustness sweep (level 0 = unchanged)."""
    PREDICTOR_INPUT: tuple[Path, str]
    """(file shipped in the bundle, class in it) that turns one raw input into the model's arrays
    without this package (see ``portable.py``)."""

    def clean(self, data: bytes, cfg) -> Cleaned:
        """Decode, bound and normalise one raw item under ``clean.<name>``; raise ``RejectedInput``."""

    def build_encoder(self, state: dict, cfg, model) -> Any:
        """The encoder (a torch module: ``forward(*arrays)`` -> (B, model.dim)) from the fitted state,
        its ``model.encoders.<name>`` params ``cfg`` and the shared ``model`` params."""

    def describe_rules(self, rules: dict) -> str:
        """One line for the model card: what the bundle accepts for this modality under clean's rules."""


class OptionalHooks:
    """Optional module attributes, for modalities whose raw item is not one file or one cell. A module
    that leaves one out gets the default below when it is registered (``fill_defaults``), so every
    caller uses the hook as it is, never probing for it.

    ``record_columns(cfg, manifest_columns, used) -> list[str]`` (default None: not a record modality)
        A *record* modality (tabular metadata): the manifest columns gathered into one JSON object
        per row, which is the modality's raw item (``cfg``: its ``data.<name>`` params; ``used``:
        the columns the pipeline already reads). collect writes ``cfg`` to ``data/raw/declared.json``.
    ``resolve_rules(cfg, declared, raw_items) -> cfg`` (default: ``cfg`` as it is, nothing read)
        Rules decided once over all raw items before any is cleaned (column types a user left to
        ``auto``): ``cfg`` is ``clean.<name>``, ``declared`` the ``data.<name>`` params collect
        recorded, ``raw_items`` an iterator over every raw item's bytes. The returned rules are what
        every item is cleaned under and what ``dataset.json`` (and the bundle) records; ``RULES``
        (default ``PARAMS["clean"]``) is their schema (``PARAMS["clean"]`` plus what is resolved).
    ``resolve_preprocess(cfg, encoder, train_info) -> (cfg, choices)`` (default: ``cfg`` as it is, ``{}``)
        Preprocess settings left to ``auto`` that follow the encoder chosen in ``model.encoders.<name>``
        (``encoder``; None when the model params are not given) or the data: ``train_info`` maps each
        of ``INFO_COLUMNS`` to its values over the train split's available items (image ``size: auto``
        = the torchvision backbone's resolution, else the images' median short side; audio ``seconds:
        auto`` = the clips' 99th-percentile duration). ``choices``: each resolved key -> {value, why},
        printed and recorded in metrics/preprocess_<name>.json. preprocess featurizes with the returned
        settings (and records them in the state).
    ``extra_requirements(state) -> list[str]`` (default: none)
        Packages the bundle's predictor needs for this fitted state beyond numpy, onnxruntime,
        soundfile, soxr and pillow (text: ``tokenizers`` with a pretrained model's tokenizer).
    ``PRESETS: dict[str, dict]`` (default: none)
        Preset name (params.PRESETS: quick, balanced, best) -> {section: {key: value}} this modality's
        subsection takes under that preset where params.yaml leaves the key to ``auto`` (the encoders'
        widths: ``{"quick": {"model": {"width": 16}}, ...}``).
    ``PARITY_VARIANTS: dict[str, Callable[[bytes], bytes]]`` (default: none)
        Name -> re-encoding of one raw item; export checks the bundle's predictor against the
        pipeline on each (audio: other rates, stereo).
    ``Features.fit`` (default None: nothing to fit)
        See :class:`Featurizer`; preprocess reads the train split's values only for a featurizer that fits.
    """

    record_columns = None

    @staticmethod
    def resolve_rules(cfg, declared: dict, raw_items) -> Any:
        return cfg

    @staticmethod
    def resolve_preprocess(cfg, encoder, train_info: dict) -> tuple[Any, dict]:
        return cfg, {}

    @staticmethod
    def extra_requirements(state: dict) -> list[str]:
        return []


OPTIONAL_HOOKS = ("record_columns", "resolve_rules", "resolve_preprocess", "extra_requirements")


def fill_defaults(module) -> None:
    """Give a modality module the optional hooks it left out (at registration, once)."""
    for name in OPTIONAL_HOOKS:
        if not hasattr(module, name):
            setattr(module, name, getattr(OptionalHooks, name))
    if not hasattr(module, "PARITY_VARIANTS"):
        module.PARITY_VARIANTS = {}
    if not hasattr(module, "RULES"):
        module.RULES = module.PARAMS["clean"]
    if not hasattr(module.Features, "fit"):
        module.Features.fit = None


def array_names(state: dict) -> list[str]:
    """A fitted state's array names in the featurizer's order (the encoder's positional order)."""
    return list(state["array_order"])


def model_dtype(stored: Any) -> np.dtype:
    """The dtype an array enters the model (and ONNX graph) with: 8-bit pixels stay uint8, other
    integers widen to int64, floats (float16 shards included) become float32."""
    stored = np.dtype(stored)
    if stored == np.uint8 or stored == np.bool_:
        return stored
    return np.dtype(np.int64) if stored.kind in "iu" else np.dtype(np.float32)
