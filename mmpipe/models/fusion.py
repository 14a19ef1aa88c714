"""The fusion model: per-modality encoders, a learned placeholder for every missing modality,
and one of three fusions (``model.fusion``):

* ``concat``    — late fusion: the modality vectors side by side into an MLP;
* ``gated``     — learned per-sample weights over the available modalities, softmax-normalised;
* ``attention`` — a small transformer over one token per modality plus a class token, with a
                  key-padding mask that hides missing modalities.

The availability mask (B, n_modalities) is an input: a missing modality's vector is replaced by
its learned placeholder, in training and at inference. ``config`` (JSON-able) holds everything
needed to rebuild the model without the data (``mmpipe.training.model_io.build_model``, which builds
the encoders from the modality registry and hands them in: this module knows torch, not modalities).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mmpipe.names import FUSIONS, embedding_key


class FusionModel(nn.Module):
    """``config``: the model's JSON config (modalities, labels, model params, fitted states); ``encoders``:
    one module per modality, taking its arrays positionally (``arrays``: their names, in that order)."""

    def __init__(self, config: dict[str, Any], encoders: dict[str, nn.Module], arrays: dict[str, list[str]]):
        super().__init__()
        self.config = config
        cfg = SimpleNamespace(**config["model"])
        self.modalities = list(config["modalities"])
        self.fusion = cfg.fusion
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        n, dim = len(self.modalities), cfg.dim
        n_outputs = config.get("outputs", len(config["labels"]))  # classes, 1 value, or one per tag
        self.encoders = nn.ModuleDict({m: encoders[m] for m in self.modalities})
        self.arrays = {m: list(arrays[m]) for m in self.modalities}
        self.placeholders = nn.Parameter(torch.zeros(n, dim))
        if self.fusion == "concat":
            fused = n * dim
        else:
            fused = dim
        if self.fusion == "gated":
            self.gate = nn.Linear(dim, 1)
        if self.fusion == "attention":
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.modality_embedding = nn.Parameter(torch.randn(1, n, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, cfg.attention_heads, 2 * dim, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, cfg.attention_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(fused), nn.Dropout(cfg.dropout), nn.Linear(fused, cfg.hidden),
                                  nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, n_outputs))

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, n_modalities, dim): each encoder's vector, whether the modality is available or not (``fuse``
        puts the placeholders in). A frozen backbone's cached output in the batch (``embedding.<m>``, see the
        loader) is projected directly."""
        return torch.stack([encode_modality(self.encoders[m], self.arrays[m], batch, m) for m in self.modalities], dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Raw outputs (B, outputs): class logits, a standardised value, tag logits (the target's ``scores``
        read them). ``batch["available"]`` is (B, len(self.modalities)), in that order."""
        return self.fuse(self.encode(batch), batch["available"].bool())

    def fuse(self, encoded: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """The raw outputs from ``encode``'s vectors and an availability mask (B, n_modalities): the
        placeholder where a modality is unavailable, then the fusion and the head. Apart from ``forward``
        so that one encoding serves every subset of modalities (evaluate's missing-modality table)."""
        tokens = torch.where(available[..., None], encoded, self.placeholders[None].to(encoded.dtype))
        if self.fusion == "concat":
            fused = tokens.flatten(1)
        elif self.fusion == "gated":
            scores = self.gate(tokens).squeeze(-1)
            usable = available | ~available.any(dim=1, keepdim=True)  # nothing available: weigh placeholders
            weights = torch.softmax(scores.masked_fill(~usable, float("-inf")), dim=1)
            fused = (weights[..., None] * tokens).sum(dim=1)
        else:
            sequence = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens + self.modality_embedding], dim=1)
            padding = torch.cat([torch.zeros_like(available[:, :1]), ~available], dim=1)  # the class token is never masked
            fused = self.transformer(sequence, src_key_padding_mask=padding)[:, 0]
        return self.head(fused)


def encode_modality(encoder: nn.Module, arrays: list[str], batch: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
    """(B, dim): ``encoder`` on its modality's arrays in ``batch`` (names ``arrays``, in its order), or its
    projection of the frozen backbone's output when the batch carries it cached (``embedding.<m>``)."""
    cached = batch.get(embedding_key(modality))
    if cached is not None:
        return encoder.project(cached.float())
    return encoder(*(batch[name] for name in arrays))


def load_pretrained(model: nn.Module) -> dict[str, dict]:
    """Copy local pretrained weights into the encoders that have them (``load_pretrained()``); called
    on a freshly built model when training starts, never when a trained model is loaded. Returns
    what each loaded (architecture, file, its sha256, frozen blocks), by modality."""
    return {m: encoder.load_pretrained() for m, encoder in getattr(model, "encoders", {}).items()
            if hasattr(encoder, "load_pretrained")}


def drop_modalities(available: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time modality dropout: hide each available modality with probability ``p``,
    never all of a sample's (one of those dropped is kept back, chosen at random)."""
    if p <= 0:
        return available
    available = available.bool()
    dropped = available & (torch.rand(available.shape, device=available.device) < p)
    kept = available & ~dropped
    empty = ~kept.any(dim=1) & available.any(dim=1)
    if empty.any():  # restore one random originally-available modality for those samples
        noise = torch.rand(available.shape, device=available.device).masked_fill(~available, -1.0)
        restore = torch.nn.functional.one_hot(noise.argmax(dim=1), available.shape[1]).bool()
        kept = kept | (restore & empty[:, None])
    return kept
