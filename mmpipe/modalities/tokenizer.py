"""Text tokenizers: one fitted on the train split (standard library + numpy only), or a pretrained
model's own (Hugging Face ``tokenizer.json``, read with the ``tokenizers`` library).

Written for the deployment bundle to ship with ``tokenizer.json`` as they are, so the predictor tokenises
exactly as training did. The fitted one is hand-written rather than a tokenizer library because the
bundle may depend only on numpy, onnxruntime, soundfile and pillow; ``tokenizers`` is imported only
when a pretrained text model is used (and then listed in the bundle's requirements).

``char`` tokens suit short, noisy, multilingual texts (misspellings share most characters);
``word`` tokens suit longer texts.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
_WORD = re.compile(r"\w+|[^\w\s]")


class Tokenizer:
    def __init__(self, kind: str, lowercase: bool, max_length: int, vocab: list[str]):
        if kind not in ("char", "word"):
            raise ValueError(f"tokenizer kind must be 'char' or 'word', got {kind!r}")
        self.kind, self.lowercase, self.max_length = kind, lowercase, max_length
        self.vocab = vocab
        self._ids = {token: i for i, token in enumerate(vocab)}

    def tokens(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        return list(text) if self.kind == "char" else _WORD.findall(text)

    @classmethod
    def fit(cls, texts: Iterable[str], kind: str, lowercase: bool, vocab_size: int, min_freq: int,
            max_length: int) -> "Tokenizer":
        """Vocabulary = the ``vocab_size - 2`` most frequent tokens (ties by token) seen >= min_freq."""
        probe = cls(kind, lowercase, max_length, [PAD, UNK])
        counts = collections.Counter(t for text in texts for t in probe.tokens(text))
        ranked = sorted((item for item in counts.items() if item[1] >= min_freq), key=lambda kv: (-kv[1], kv[0]))
        return cls(kind, lowercase, max_length, [PAD, UNK] + [t for t, _ in ranked[: vocab_size - 2]])

    def encode(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (B, max_length) int32 padded with PAD_ID, lengths (B,) int32 (0 for None)."""
        ids = np.zeros((len(texts), self.max_length), np.int32)
        lengths = np.zeros(len(texts), np.int32)
        for i, text in enumerate(texts):
            if text is None:
                continue
            row = [self._ids.get(t, UNK_ID) for t in self.tokens(text)][: self.max_length]
            ids[i, : len(row)] = row
            lengths[i] = len(row)
        return ids, lengths

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "max_length": self.max_length, "vocab": self.vocab}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer | PretrainedTokenizer":
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        if "model" in d:  # a Hugging Face tokenizer.json (PretrainedTokenizer.save)
            return PretrainedTokenizer.load(path)
        return cls(d["kind"], d["lowercase"], d["max_length"], d["vocab"])


class PretrainedTokenizer:
    """A pretrained model's tokenizer (its ``tokenizer.json``: normaliser, vocabulary, special tokens),
    truncating and right-padding to ``max_length``; saved with those settings, so the bundle's copy
    encodes exactly as preprocess did."""

    def __init__(self, tokenizer, max_length: int):
        self.max_length = max_length
        self.tokenizer = tokenizer
        tokenizer.enable_truncation(max_length)
        padding = tokenizer.padding or {}
        self.pad_id = int(padding.get("pad_id", _special_id(tokenizer, ("[PAD]", "<pad>", "<|pad|>"))))
        tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=padding.get("pad_token", "[PAD]"),
                                 length=max_length)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path, max_length: int) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), max_length)

    def encode(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (B, max_length) int32 (special tokens included, right-padded), lengths (B,) int32 (0 for None)."""
        ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        lengths = np.zeros(len(texts), np.int32)
        present = [i for i, text in enumerate(texts) if text is not None]
        for i, encoding in zip(present, self.tokenizer.encode_batch([texts[i] for i in present])):
            ids[i] = encoding.ids
            lengths[i] = sum(encoding.attention_mask)
        return ids, lengths

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer = HFTokenizer.from_file(str(path))
        return cls(tokenizer, int(tokenizer.truncation["max_length"]))


def _special_id(tokenizer, candidates: tuple[str, ...]) -> int:
    for token in candidates:
        if tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0
