"""Latency measurement shared by the stages that report it (evaluate, compress)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def latency_ms(run: Callable[[], object], runs: int) -> dict[str, float]:
    """p50/p95 wall time of ``run()`` in milliseconds, after warm-up runs (caches, allocators, lazy init)."""
    for _ in range(max(3, runs // 5)):
        run()
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    ms = np.array(times) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p95": round(float(np.percentile(ms, 95)), 3)}
