"""category: one class per sample (the default; softmax + cross-entropy with label smoothing)."""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: clean parses cells in processes that never need it
    import torch

from mmpipe.targets.base import SET_TOLERANCE, UNLABELLED, Target
from mmpipe.targets.metrics import calibration, classification


class Category(Target):
    NAME = "category"
    HEADLINE = "accuracy"

    def parse(self, cell: str | None) -> str:
        # NFC and outer whitespace only: "Cat " and "Cat" are one class, "cat" another
        return unicodedata.normalize("NFC", cell).strip() if cell is not None else UNLABELLED

    def fit(self, train_cells: Sequence[str], kept_cells: Sequence[str]) -> dict[str, Any]:
        return {"labels": sorted(set(kept_cells))}  # every kept class, even one the train split lacks (warned)

    @property
    def labels(self) -> list[str]:
        return self.state["labels"]

    @property
    def width(self) -> int:
        return len(self.labels)

    def encode(self, cells: Sequence[str]) -> np.ndarray:
        index = {label: i for i, label in enumerate(self.labels)}
        return np.array([index[c] for c in cells], dtype=np.int64)

    def loss(self, train_params) -> torch.nn.Module:
        import torch
        return torch.nn.CrossEntropyLoss(label_smoothing=train_params.label_smoothing)

    def loss_sum(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.nn.functional.cross_entropy(outputs, encoded, reduction="sum")

    def distill_loss(self, outputs: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        import torch.nn.functional as F
        # Hinton et al.: KL to the teacher's softened class distribution, x T² so gradients keep their scale
        return F.kl_div(F.log_softmax(outputs / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                        log_target=True, reduction="batchmean") * temperature ** 2

    def running(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        return (outputs.argmax(dim=1) == encoded).sum().double().reshape(1)

    def from_running(self, sums: list[float], n: int) -> float:
        return sums[0] / max(n, 1)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.softmax(outputs.float(), dim=1)

    def headline(self, scores: np.ndarray, encoded: np.ndarray) -> float:
        return float((scores.argmax(axis=1) == encoded).mean())

    def metrics(self, scores: np.ndarray, encoded: np.ndarray, ece_bins: int) -> dict[str, Any]:
        return classification(scores, encoded, self.labels, ece_bins)

    def chance(self, encoded: np.ndarray) -> float:
        return float(np.bincount(encoded, minlength=self.width).max() / max(len(encoded), 1))

    def answer(self, scores_row: np.ndarray) -> dict[str, Any]:
        return {"label": self.labels[int(scores_row.argmax())],
                "probabilities": {lab: round(float(x), 6) for lab, x in zip(self.labels, scores_row)}}

    def agree(self, a: dict[str, Any], b: dict[str, Any], between_models: bool = False) -> bool:
        return a.get("label") == b.get("label")

    def score_answers(self, answers: list[dict[str, Any]], encoded: np.ndarray) -> float:
        return float(np.mean([a.get("label") == self.labels[y] for a, y in zip(answers, encoded)]))

    CONFORMAL_SCORE = "lac"  # 1 - p(true class): the smallest mean set for the coverage (Sadinle et al. 2019)

    def probabilities(self, outputs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        z = np.asarray(outputs, np.float64) / temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def nll(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> float:
        from scipy.special import logsumexp
        z = np.asarray(outputs, np.float64) / temperature
        return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), encoded]))

    def nonconformity(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return 1.0 - self.probabilities(outputs, temperature)[np.arange(len(encoded)), encoded]

    def prediction_sets(self, outputs: np.ndarray, temperature: float, threshold: np.ndarray) -> np.ndarray:
        # may be empty: at a level the model beats, the least certain rows get no class (coverage stays exact)
        return self.probabilities(outputs, temperature) >= 1.0 - np.asarray(threshold)[:, None] - SET_TOLERANCE

    def covers(self, sets: np.ndarray, encoded: np.ndarray) -> np.ndarray:
        return sets[np.arange(len(encoded)), encoded]

    def reliability(self, probabilities: np.ndarray, encoded: np.ndarray, bins: int) -> tuple[float, list[dict]]:
        return calibration(probabilities, encoded, bins)

    def covered_by(self, answer: dict[str, Any], encoded_row) -> bool:
        return self.labels[int(encoded_row)] in answer.get("prediction_set", ())
