"""Robustness summaries (the per-target metrics live with each target type: mmpipe/targets/)."""

from __future__ import annotations

import numpy as np


def area_under(levels: list[float], scores: list[float]) -> float:
    """Relative robustness (MultiBench): area under headline-metric-vs-noise-level, per unit of level range."""
    span = levels[-1] - levels[0]
    return float(np.trapezoid(scores, levels) / span) if span > 0 else float(scores[0])
