"""Device choice shared by the stages that can use a GPU."""

from __future__ import annotations

from mmpipe.errors import PipelineError


def resolve_device(requested: str, key: str) -> str:
    """'auto' -> 'cuda' when a CUDA device is present, else 'cpu'; 'cuda' without one is an error naming ``key``."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"params.yaml: {key} is 'cuda' but no CUDA device is available")
    return "cuda" if requested in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


def seed_everything(seed: int, device) -> None:
    """Seed python, numpy and torch; on CPU, torch's deterministic algorithms too (byte-reproducible runs)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
