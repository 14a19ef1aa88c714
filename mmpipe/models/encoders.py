"""Encoder architectures, each mapping raw feature tensors to a ``dim``-vector. A modality module
picks one in its ``build_encoder`` (this module knows no modality: an architecture serves any
input of its shape). Normalisation (mean/std fitted on train by preprocess) lives inside
the encoder as buffers, so an exported model takes the raw tensors the predictor computes.
Training-time augmentation lives here too, active only in ``train()`` mode.

Layers are limited to what ONNX export and int8 quantization handle well: conv, linear,
batch-norm (folded at export), embedding, pooling.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def affine_jitter(x: torch.Tensor) -> torch.Tensor:
    """Rotate ±10°, scale 0.9-1.1, shift ±6 % — per sample, from torch's seeded generator."""
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, device=x.device)
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * 0.12
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PixelCNN(nn.Module):
    """uint8 (B, C, H, W) -> (B, dim): a small VGG-style CNN; random affine jitter while training."""

    def __init__(self, channels: int, mean: list[float], std: list[float], dim: int, width: int = 24,
                 augment: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.augment = augment
        # one convolution at full resolution, two at 1/2, one at 1/4: ~22 MFLOP for 32x32 at width 24
        self.features = nn.Sequential(
            conv_block(channels, width), nn.MaxPool2d(2),
            conv_block(width, 2 * width), conv_block(2 * width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(4 * width, dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255.0 - self.mean) / self.std
        if self.training and self.augment:
            x = affine_jitter(x)
        return self.out(self.features(x))


class TokenCNN(nn.Module):
    """int32 token ids (B, L) + lengths (B,) -> (B, dim): embedding, two 1-D convolutions, masked max-pool."""

    def __init__(self, vocab_size: int, dim: int, embed_dim: int = 64, width: int = 128, token_dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.conv1 = nn.Conv1d(embed_dim, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.out = nn.Linear(width, dim)
        self.token_dropout = token_dropout

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tokens = token_ids.long()
        if self.training and self.token_dropout > 0:  # replace random tokens by <unk> (id 1)
            drop = (torch.rand(tokens.shape, device=tokens.device) < self.token_dropout) & (tokens > 1)
            tokens = torch.where(drop, torch.ones_like(tokens), tokens)
        x = self.embed(tokens).transpose(1, 2)  # (B, E, L)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        valid = positions[None, :] < lengths.long().clamp(min=1)[:, None]  # at least one position
        x = x.masked_fill(~valid[:, None, :], torch.finfo(x.dtype).min).amax(dim=2)
        return self.out(x)


class SpectrogramCNN(nn.Module):
    """float16 spectrogram (B, M, T) -> (B, dim): 2-D CNN; SpecAugment time/frequency masks while training."""

    def __init__(self, mean: list[float], std: list[float], dim: int, width: int = 16, augment: bool = True,
                 freq_mask: int = 8, time_mask: int = 20):
        super().__init__()
        import torchaudio

        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, -1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, -1, 1))
        self.augment = augment
        self.freq_masking = torchaudio.transforms.FrequencyMasking(freq_mask, iid_masks=True)
        self.time_masking = torchaudio.transforms.TimeMasking(time_mask, iid_masks=True)
        # a strided first convolution, then pooling: ~17 MFLOP for a 64 x 151 log-mel at width 16
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            conv_block(width, 2 * width), nn.MaxPool2d(2),
            conv_block(2 * width, 4 * width), nn.MaxPool2d(2),
            conv_block(4 * width, 8 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out = nn.Linear(8 * width, dim)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        x = (spectrogram.float().unsqueeze(1) - self.mean) / self.std  # (B, 1, M, T)
        if self.training and self.augment:
            x = self.time_masking(self.freq_masking(x))  # masked cells become 0 = the mean
        return self.out(self.features(x))


class RecordMLP(nn.Module):
    """Tabular cells -> (B, dim): numbers (B, 2k: standardised values, then missing indicators) and
    category ids (B, c) each into an embedding, concatenated, then a two-layer MLP. Either input is
    absent when the record has no column of that kind. While training, ``cell_dropout`` of the cells
    are made missing, so the model does not lean on any single column."""

    def __init__(self, n_numeric: int, cardinalities: list[int], dim: int, embed_dim: int = 8, width: int = 64,
                 cell_dropout: float = 0.1):
        super().__init__()
        self.n_numeric, self.cell_dropout = n_numeric, cell_dropout
        # one table for every column: column j's ids are offset past the previous columns' ids
        self.register_buffer("offsets", torch.tensor([0, *cardinalities[:-1]], dtype=torch.int64).cumsum(0))
        self.embed = nn.Embedding(sum(cardinalities), embed_dim) if cardinalities else None
        self.mlp = nn.Sequential(nn.Linear(2 * n_numeric + embed_dim * len(cardinalities), width), nn.ReLU(),
                                 nn.Linear(width, width), nn.ReLU())
        self.out = nn.Linear(width, dim)

    def forward(self, *arrays: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.n_numeric:
            numeric = arrays[0].float()
            if self.training and self.cell_dropout > 0:
                k = self.n_numeric
                drop = torch.rand(numeric.shape[0], k, device=numeric.device) < self.cell_dropout
                numeric = torch.cat([numeric[:, :k].masked_fill(drop, 0.0), numeric[:, k:].masked_fill(drop, 1.0)], 1)
            parts.append(numeric)
        if self.embed is not None:
            ids = arrays[-1].long()
            if self.training and self.cell_dropout > 0:  # id 0 = missing
                ids = ids.masked_fill(torch.rand(ids.shape, device=ids.device) < self.cell_dropout, 0)
            parts.append(self.embed(ids + self.offsets).flatten(1))
        return self.out(self.mlp(torch.cat(parts, 1)))
