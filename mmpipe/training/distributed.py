"""Data-parallel training under ``torchrun``: joining the process group, and this process's place in it.

torchrun starts N copies of the train stage with WORLD_SIZE / RANK / LOCAL_RANK set; without them
the stage is one process (rank 0 of 1) and nothing here does anything.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes outputs, checkpoints and logs."""
        return self.rank == 0


def world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join torchrun's group for the block: NCCL when ``device`` is 'cuda' (one GPU per local rank), else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield World()
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves in one process)."""
    if world().size == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return [type(v)(t) for v, t in zip(values, total.tolist())]


def from_main(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every process (so that all of them take the same decisions)."""
    if world().size == 1:
        return value
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return shared.item()
