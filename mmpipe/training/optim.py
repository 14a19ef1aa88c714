"""The optimiser pieces train and pretrain share: the learning-rate schedule and AdamW's parameter groups.

A module of its own so that the pretrain stage depends on these and not on the training loop.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def warmup_cosine(warmup: int, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier of each optimiser step: linear warm-up over ``warmup`` steps, then
    half a cosine from 1 down to 0 at ``total_steps``."""
    def multiplier(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(warmup, 1))
        return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(total_steps - warmup, 1))))
    return multiplier


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """AdamW parameter groups: everything at ``lr``, except the parameters of modules that carry an
    ``lr_scale`` (pretrained backbones) at ``lr * lr_scale``. One group when no module does."""
    scale_of: dict[int, float] = {}
    for module in model.modules():
        scale = getattr(module, "lr_scale", None)
        if scale is not None:
            scale_of.update({id(p): float(scale) for p in module.parameters()})
    scales = sorted({*scale_of.values()} - {1.0}, reverse=True)
    groups = [{"params": [p for p in model.parameters() if scale_of.get(id(p), 1.0) == 1.0], "lr": lr}]
    groups += [{"params": [p for p in model.parameters() if scale_of.get(id(p)) == s], "lr": lr * s} for s in scales]
    return groups
