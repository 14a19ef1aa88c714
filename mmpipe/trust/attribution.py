"""How much each modality contributes: exact Shapley values of the modalities (players) for a value function
v(S) = the model's figure with only the modalities S available, read from the subset evaluations evaluate
already runs (plus v(empty): nothing available, the model's prior), and the pairwise Shapley interaction index.

Exact, not sampled: with M <= 6 modalities there are at most 64 subsets (evaluate runs them anyway), and the
closed forms below are a few lines; libraries such as shap approximate per-sample feature attributions, not
this.

    phi_i  = sum over S without i of |S|! (M-|S|-1)! / M! * (v(S+i) - v(S))
    I_ij   = sum over S without i, j of |S|! (M-|S|-2)! / (M-1)! * (v(S+i+j) - v(S+i) - v(S+j) + v(S))

Efficiency: sum of phi_i = v(all) - v(empty).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

Value = Callable[[frozenset], float]


def shapley(players: list[str], value: dict[frozenset, float]) -> dict[str, float]:
    """Each player's Shapley value under ``value`` (every subset of ``players``, the empty one included)."""
    m = len(players)
    out = {}
    for i in players:
        others = [p for p in players if p != i]
        total = 0.0
        for k in range(m):
            weight = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
            for s in itertools.combinations(others, k):
                s = frozenset(s)
                total += weight * (value[s | {i}] - value[s])
        out[i] = total
    return out


def interactions(players: list[str], value: dict[frozenset, float]) -> dict[str, float]:
    """The Shapley interaction index of each pair ("image+audio"): > 0, the pair does more together than
    apart (complementary); < 0, they carry the same information (redundant)."""
    m = len(players)
    out = {}
    for i, j in itertools.combinations(players, 2):
        others = [p for p in players if p not in (i, j)]
        total = 0.0
        for k in range(m - 1):
            weight = math.factorial(k) * math.factorial(m - k - 2) / math.factorial(m - 1)
            for s in itertools.combinations(others, k):
                s = frozenset(s)
                total += weight * (value[s | {i, j}] - value[s | {i}] - value[s | {j}] + value[s])
        out[f"{i}+{j}"] = total
    return out


def shares(values: dict[str, float]) -> dict[str, float] | None:
    """Each player's share of the positive contributions (a negative Shapley value counts as 0); None when no
    player contributes (nothing to share)."""
    positive = {p: max(v, 0.0) for p, v in values.items()}
    total = sum(positive.values())
    return {p: v / total for p, v in positive.items()} if total > 0 else None


def attribution(players: list[str], value: dict[frozenset, float]) -> dict:
    """Shapley values, their shares, the pairwise interactions, and the two ends (v(all), v(empty)) of one value
    function."""
    phi = shapley(players, value)
    return {"shapley": phi, "share": shares(phi), "interaction": interactions(players, value),
            "all": value[frozenset(players)], "none": value[frozenset()]}
