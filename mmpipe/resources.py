"""What a stage's process used, for its metrics file and MLflow row: wall time since the process
started (interpreter start-up and the imports of torch/mlflow included: part of a stage's cost),
peak resident memory, peak GPU memory (when this process used CUDA) and bytes it wrote to storage."""

from __future__ import annotations

import os
import resource
import sys
import time

_IMPORTED = time.perf_counter()


def _seconds_since_start() -> float:
    """From /proc (Linux): the process's start time against the system's uptime; elsewhere, from the
    first import of this module (early: the stages import mmpipe first)."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def _bytes_written() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
    except (OSError, ValueError, StopIteration):
        return None


def usage() -> dict[str, float]:
    """{wall_s, peak_rss_mb, written_mb (Linux), peak_gpu_memory_mb (when CUDA was used)} of this process
    so far (its worker processes' peak included)."""
    # ru_maxrss: KiB on Linux, bytes on macOS
    unit = 1 if sys.platform == "darwin" else 1024
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    out = {"wall_s": round(_seconds_since_start(), 2), "peak_rss_mb": round(peak * unit / 2**20, 1)}
    written = _bytes_written()
    if written is not None:
        out["written_mb"] = round(written / 2**20, 1)
    torch = sys.modules.get("torch")  # only if the stage imported it: never import torch for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
