"""Text modality: its params, validation and normalisation (clean), token-id features (preprocess),
corruptions for the robustness sweep (evaluate), its encoder and its predictor input."""

from __future__ import annotations

import json
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from mmpipe.modalities import inputs
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import decode_text
from mmpipe.errors import PipelineError
from mmpipe.extras import require
from mmpipe.modalities.tokenizer import PretrainedTokenizer, Tokenizer
from mmpipe.schema import Backbone, Embeddable, Strict, check_weights_folder

NAME = "text"
EXTENSIONS = (".txt",)
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.string()
INFO_COLUMNS = {"chars": pa.int32()}
INLINE = True  # a manifest's text cell is the text itself
PREDICTOR_INPUT = (Path(inputs.__file__), "TextInput")
LENGTH = f"{NAME}_length"  # the second array: tokens before padding


# --------------------------------------------------------------------------- params


class Clean(Strict):
    max_chars: int = Field(1000, ge=1)
    max_bytes: int = Field(1_000_000, ge=1)


class Preprocess(Embeddable):
    # char | word (fitted on train) | a Hugging Face model folder holding tokenizer.json (and config.json)
    tokenizer: str = Field("char", min_length=1)
    vocab_size: int = Field(512, ge=3, le=1_000_000)
    lowercase: bool = True
    max_length: int = Field(48, ge=1, le=100_000)
    min_freq: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _model_folder_in_weights_text(self) -> "Preprocess":
        if self.tokenizer not in ("char", "word"):
            check_weights_folder(self.tokenizer, NAME, f"preprocess.{NAME}.tokenizer")
        return self


class Encoder(Backbone):
    # arch: small_cnn (TokenCNN) or huggingface: the transformer encoder whose folder preprocess.text.tokenizer
    # names (its config.json), weights from a local folder (AutoModel.from_pretrained, local files only)
    embed_dim: int = Field(64, ge=4, le=4096)
    width: int = Field(128, ge=4, le=4096)
    token_dropout: float = Field(0.1, ge=0.0, lt=1.0)


PARAMS = {"clean": Clean, "preprocess": Preprocess, "model": Encoder}

# the encoder's width under each preset (params.PRESETS; balanced = the schema default)
PRESETS = {"quick": {"model": {"width": 64}}, "balanced": {"model": {"width": 128}},
           "best": {"model": {"width": 192}}}


def describe_rules(rules: dict) -> str:
    return f"UTF-8 text of at most {rules['max_bytes']:,} bytes, cut to {rules['max_chars']:,} characters"


def clean(data: bytes, cfg) -> Cleaned:
    """Decode and normalise under clean.text's rules (portable.decode_text); cut to max_chars."""
    text, info = decode_text(data, cfg.model_dump())
    out = text.encode("utf-8")
    return Cleaned(out, converted=out != data, info=info)


# --------------------------------------------------------------------------- features (preprocess)


TOKENIZER_KINDS = ("char", "word")  # fitted here; anything else names a pretrained model's folder


def pretrained_tokenizer(folder: str, max_length: int) -> tuple[PretrainedTokenizer, dict | None]:
    """The tokenizer of the Hugging Face model in ``folder`` and that model's config (None without config.json)."""
    path = Path(folder)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise PipelineError(f"preprocess.{NAME}.tokenizer: {file} not found — it is char, word or a Hugging Face model "
                            f"folder: on a connected machine, AutoTokenizer.from_pretrained(name).save_pretrained(folder) "
                            f"and AutoModel.from_pretrained(name).save_pretrained(folder), then copy the folder")
    require("tokenizers", f"preprocess.{NAME}.tokenizer: {folder} (a pretrained model's tokenizer)")
    try:
        tokenizer = PretrainedTokenizer.from_file(file, max_length)
    except Exception as exc:  # noqa: BLE001 - a user's file: one line
        raise PipelineError(f"preprocess.{NAME}.tokenizer: {file} is not a tokenizers file "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    config = file.parent / "config.json"
    return tokenizer, (json.loads(config.read_text()) if config.is_file() else None)


class Features:
    """Clean text -> int32 token ids (max_length) + length, with a tokenizer fitted on train only (char,
    word) or a pretrained model's own (``tokenizer``: its folder)."""

    gpu = False

    def __init__(self, cfg, dataset: dict):
        self.cfg = cfg
        self.tokenizer: Tokenizer | PretrainedTokenizer | None = None
        self.model_config = None
        self.arrays = {NAME: ((cfg.max_length,), np.int32), LENGTH: ((), np.int32)}
        self.stats = None

    def fit(self, train_texts: list[str]) -> None:
        """Fit a char/word tokenizer on the train texts, or load the pretrained model's (which they do not change)."""
        if self.cfg.tokenizer in TOKENIZER_KINDS:
            self.tokenizer = Tokenizer.fit(train_texts, self.cfg.tokenizer, self.cfg.lowercase, self.cfg.vocab_size,
                                           self.cfg.min_freq, self.cfg.max_length)
        else:
            self.tokenizer, self.model_config = pretrained_tokenizer(self.cfg.tokenizer, self.cfg.max_length)

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> "Features":
        """The fitted featurizer (tokenizer included) back from a preprocess output folder."""
        features = cls(SimpleNamespace(max_length=state["max_length"]), {})
        features.tokenizer = Tokenizer.load(Path(folder) / state["tokenizer"])
        return features

    def transform(self, items: list[str | None], ids: list[str],
                  noise: Callable[[list[str]], list[str]] | None = None,
                  *, errors: dict[int, str], device: str = "cpu") -> dict[str, np.ndarray]:
        """``noise`` (evaluate's robustness sweep) maps the list of present texts. (Clean text always
        tokenizes: ``errors``, where the other featurizers record items that do not decode, stays empty.)"""
        if noise is not None:
            present = [i for i, t in enumerate(items) if t is not None]
            noisy = noise([items[i] for i in present])
            items = list(items)
            for i, t in zip(present, noisy):
                items[i] = t
        token_ids, lengths = self.tokenizer.encode(items)
        return {NAME: token_ids, LENGTH: lengths}

    def state(self) -> dict:
        if isinstance(self.tokenizer, PretrainedTokenizer):  # the model's config: its architecture, for train
            return {"tokenizer": "tokenizer.json", "vocab_size": self.tokenizer.vocab_size, "kind": "pretrained",
                    "source": self.cfg.tokenizer, "max_length": self.cfg.max_length, "model_config": self.model_config}
        return {"tokenizer": "tokenizer.json", "vocab_size": len(self.tokenizer.vocab), "kind": self.cfg.tokenizer,
                "lowercase": self.cfg.lowercase, "max_length": self.cfg.max_length}

    def save(self, folder) -> None:
        self.tokenizer.save(folder / "tokenizer.json")

    @staticmethod
    def state_files(state: dict) -> list[str]:
        return [state["tokenizer"]]


# --------------------------------------------------------------------------- corruptions (evaluate)

_LETTERS = np.array(list(string.ascii_lowercase))


def typos(texts: list[str], level: float, rng: np.random.Generator) -> list[str]:
    """Character corruption: each character is, with probability ``level``, replaced by a random
    letter, deleted, or followed by an inserted random letter (one of the three at random)."""
    if level <= 0:
        return texts
    out = []
    for text in texts:
        hit = rng.random(len(text)) < level
        kind = rng.integers(0, 3, len(text))
        letters = rng.choice(_LETTERS, (len(text), 2))
        chars = []
        for ch, h, k, (a, b) in zip(text, hit, kind, letters):
            if not h:
                chars.append(ch)
            elif k == 0:  # replace
                chars.append(a)
            elif k == 2:  # insert after
                chars += [ch, b]
            # k == 1: delete
        out.append("".join(chars))
    return out


CORRUPTIONS = {"typos": typos}


# --------------------------------------------------------------------------- encoder (train)


def extra_requirements(state: dict) -> list[str]:
    """Packages the bundle's predictor needs beyond its base set for this fitted state."""
    return ["tokenizers"] if state.get("kind") == "pretrained" else []


def build_encoder(state: dict, cfg: Encoder, model):
    if cfg.arch != "small_cnn":
        if cfg.arch != "huggingface":
            raise PipelineError(f"model.encoders.{NAME}.arch: {cfg.arch!r} is not small_cnn or huggingface")
        if state.get("kind") != "pretrained" or not state.get("model_config"):
            raise PipelineError(f"model.encoders.{NAME}.arch huggingface needs preprocess.{NAME}.tokenizer to name the "
                                f"model's folder (its tokenizer.json and config.json; now {state.get('source') or state.get('kind')})")
        from mmpipe.models.backbones import TransformersEncoder

        return TransformersEncoder(NAME, state["model_config"], model.dim, cfg.weights, cfg.freeze, cfg.lr_scale,
                                   cfg.checkpointing)
    from mmpipe.models.encoders import TokenCNN  # torch only where a model is built

    return TokenCNN(state["vocab_size"], model.dim, cfg.embed_dim, cfg.width, cfg.token_dropout)
