"""number: one real value per sample (regression). The head predicts the (transformed) value
standardised with the train split's mean and standard deviation: a learning rate and a Huber loss then
mean the same for a price in dollars as for a length of stay in days. Answers are in the user's units."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: clean parses cells in processes that never need it
    import torch

from mmpipe.targets.base import UNLABELLED, BadTarget, Target
from mmpipe.targets.metrics import regression

TRANSFORMS = ("none", "log")  # log: log1p, so 0 is allowed and negative values are rejected


def huber_on_first_output() -> "torch.nn.Module":
    """Huber loss (delta 1, on the standardised scale: quadratic within one train standard deviation,
    linear beyond, so a few extreme values do not dominate) of the head's single output."""
    import torch

    class HuberOnFirstOutput(torch.nn.Module):
        def forward(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.huber_loss(outputs[:, 0], encoded.to(outputs.dtype), delta=1.0)

    return HuberOnFirstOutput()


class Number(Target):
    NAME = "number"
    HEADLINE = "r2"
    RUNNING_SIZE = 3

    @property
    def transform(self) -> str:
        return self.spec.get("transform", "none")

    def parse(self, cell: str | None) -> str:
        text = (cell or "").strip()
        if not text:
            return UNLABELLED
        try:
            value = float(text)
        except ValueError:
            raise BadTarget("target_not_a_number", f"target {text[:40]!r} is not a number") from None
        if not math.isfinite(value):
            raise BadTarget("target_not_finite", f"target {text[:40]!r} is not a finite number")
        if self.transform == "log" and value < 0:
            raise BadTarget("target_negative_under_log", f"target {value:g} is negative (data.target.transform: log)")
        return repr(value)

    def _forward(self, values: np.ndarray) -> np.ndarray:
        return np.log1p(values) if self.transform == "log" else values

    def _inverse(self, values: np.ndarray) -> np.ndarray:
        return np.expm1(values) if self.transform == "log" else values

    def fit(self, train_cells: Sequence[str], kept_cells: Sequence[str]) -> dict[str, Any]:
        values = np.array([float(c) for c in train_cells], dtype=np.float64)
        if len(values) == 0:
            raise ValueError("no labelled train row")
        moved = self._forward(values)
        std = float(moved.std())
        return {"transform": self.transform, "mean": float(moved.mean()), "std": std if std > 0 else 1.0,
                "train_min": float(values.min()), "train_max": float(values.max()),
                "train_std": float(values.std()), "train_rows": int(len(values))}

    @property
    def width(self) -> int:
        return 1

    def encode(self, cells: Sequence[str]) -> np.ndarray:
        values = self._forward(np.array([float(c) for c in cells], dtype=np.float64))
        # float64: evaluation decodes these back to the user's units (float32 would move 412.5 by ~4e-5)
        return (values - self.state["mean"]) / self.state["std"]

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """Model-scale values -> the user's units."""
        return self._inverse(np.asarray(encoded, np.float64) * self.state["std"] + self.state["mean"])

    def loss(self, train_params) -> torch.nn.Module:
        return huber_on_first_output()

    def loss_sum(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.nn.functional.huber_loss(outputs[:, 0], encoded.to(outputs.dtype), delta=1.0, reduction="sum")

    def distill_loss(self, outputs: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        import torch
        # no distribution to soften: the teacher's prediction (standardised scale) is the target
        return torch.nn.functional.mse_loss(outputs[:, 0], teacher[:, 0])

    def running(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        import torch
        y, error = encoded.double(), outputs[:, 0].double() - encoded.double()
        return torch.stack([(error * error).sum(), y.sum(), (y * y).sum()])

    def from_running(self, sums: list[float], n: int) -> float:
        sse, sy, syy = sums
        total = syy - sy * sy / max(n, 1)
        return 1.0 - sse / total if total > 0 else 0.0  # R² on the model's (standardised, transformed) scale

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        import torch
        z = outputs[:, 0].double() * self.state["std"] + self.state["mean"]
        return torch.expm1(z) if self.transform == "log" else z

    def headline(self, scores: np.ndarray, encoded: np.ndarray) -> float:
        return regression(scores, self.decode(encoded))["r2"]

    def metrics(self, scores: np.ndarray, encoded: np.ndarray, ece_bins: int) -> dict[str, Any]:
        truth = self.decode(encoded)
        return {"summary": regression(scores, truth), "predicted": np.asarray(scores, np.float64), "truth": truth}

    def chance(self, encoded: np.ndarray) -> float:
        return 0.0  # R² of always answering the mean

    def answer(self, scores_row: np.ndarray) -> dict[str, Any]:
        return {"value": float(np.asarray(scores_row).reshape(-1)[0])}

    def tolerance(self, between_models: bool = False) -> float:
        """Two answers agree within this absolute difference: 1e-3 of the train values' standard deviation for
        one model on two paths (parity), 5 % of it between two models (int8 vs fp32)."""
        return (0.05 if between_models else 1e-3) * max(self.state.get("train_std", 1.0), 1e-12)

    def agree(self, a: dict[str, Any], b: dict[str, Any], between_models: bool = False) -> bool:
        return "value" in a and "value" in b and abs(a["value"] - b["value"]) <= self.tolerance(between_models)

    def score_answers(self, answers: list[dict[str, Any]], encoded: np.ndarray) -> float:
        mean = float(self.decode(np.zeros(1))[0])  # an unread row: the train mean's answer
        return regression(np.array([a.get("value", mean) for a in answers]), self.decode(encoded))["r2"]

    TEMPERATURE = False
    CONFORMAL_SCORE = "abs_residual"  # |prediction - truth| on the standardised (transformed) scale

    def nll(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> float:
        residual = np.asarray(outputs, np.float64)[:, 0] - np.asarray(encoded, np.float64)
        return float(np.mean(0.5 * (np.log(2 * np.pi) + residual ** 2)))

    def nonconformity(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return np.abs(np.asarray(outputs, np.float64)[:, 0] - np.asarray(encoded, np.float64))

    def prediction_sets(self, outputs: np.ndarray, temperature: float, threshold: np.ndarray) -> np.ndarray:
        # the interval on the model's scale, mapped to the user's units: monotone, so coverage carries over
        z, q = np.asarray(outputs, np.float64)[:, 0], np.asarray(threshold, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.stack([self.decode(z - q), self.decode(z + q)], axis=1)

    def covers(self, sets: np.ndarray, encoded: np.ndarray) -> np.ndarray:
        truth = self.decode(encoded)
        slack = 1e-9 * np.maximum(1.0, np.abs(truth))
        return (sets[:, 0] - slack <= truth) & (truth <= sets[:, 1] + slack)

    def set_sizes(self, sets: np.ndarray) -> np.ndarray:
        return sets[:, 1] - sets[:, 0]

    def set_answer(self, set_row: np.ndarray) -> list:
        return [float(x) if np.isfinite(x) else None for x in set_row]

    def covered_by(self, answer: dict[str, Any], encoded_row) -> bool:
        if "interval" not in answer:
            return False
        truth = float(self.decode(np.array([encoded_row]))[0])
        low, high = answer["interval"]
        slack = 1e-9 * max(1.0, abs(truth))
        return (low is None or low - slack <= truth) and (high is None or truth <= high + slack)

    def same_set(self, a, b) -> bool:
        return a is not None and b is not None and all(
            (x is None and y is None) or (x is not None and y is not None and abs(x - y) <= self.tolerance())
            for x, y in zip(a, b))
