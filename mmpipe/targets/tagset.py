"""set: any number of tags per sample, none included (multi-label). One sigmoid per tag with binary
cross-entropy, each tag's positives weighted by how rare it is in the train split; the tags answered are
those whose probability reaches the tag's threshold, tuned on the validation split after training."""

from __future__ import annotations

import collections
import json
import unicodedata
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: clean parses cells in processes that never need it
    import torch

from mmpipe.targets.base import SET_TOLERANCE, UNLABELLED, BadTarget, Target, f1_from_counts
from mmpipe.targets.metrics import binary_calibration, multilabel

MAX_TAGS, MAX_TAG_CHARS = 1000, 200
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
MAX_POS_WEIGHT = 100.0  # a tag in 1 of 10,000 rows would otherwise weigh 10,000x


class TagSet(Target):
    NAME = "set"
    HEADLINE = "f1_micro"
    RUNNING_SIZE = 3
    TUNES_ON_VAL = True

    def parse(self, cell: str | None) -> str:
        text = (cell or "").strip()
        if not text:
            return "[]" if self.spec.get("empty", "no_tags") == "no_tags" else UNLABELLED
        if text.startswith("["):  # a JSON list: JSONL/Parquet list cells arrive so
            try:
                items = json.loads(text)
            except ValueError:
                raise BadTarget("target_not_a_tag_list", f"target {text[:40]!r} is not a JSON list of tags") from None
            if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                raise BadTarget("target_not_a_tag_list", f"target {text[:40]!r} is not a list of strings")
        else:
            items = text.split(self.spec.get("separator", ";"))
        tags = sorted({unicodedata.normalize("NFC", t).strip() for t in items} - {""})
        if len(tags) > MAX_TAGS:
            raise BadTarget("target_too_many_tags", f"target has {len(tags)} tags (at most {MAX_TAGS})")
        long = next((t for t in tags if len(t) > MAX_TAG_CHARS), None)
        if long is not None:
            raise BadTarget("target_tag_too_long", f"tag {long[:40]!r}... is longer than {MAX_TAG_CHARS} characters")
        return json.dumps(tags, ensure_ascii=False)

    def fit(self, train_cells: Sequence[str], kept_cells: Sequence[str]) -> dict[str, Any]:
        counts = collections.Counter(t for c in train_cells for t in json.loads(c))
        min_count = self.spec.get("min_count", 1)
        tags = sorted(t for t, n in counts.items() if n >= min_count)
        if not tags:
            raise ValueError(f"no tag occurs in {min_count} or more train rows (data.target.min_count)")
        n = len(train_cells)
        return {"tags": tags, "train_rows": n, "train_count": [counts[t] for t in tags],
                "pos_weight": [float(min(MAX_POS_WEIGHT, (n - counts[t]) / counts[t])) for t in tags],
                "rare_tags_dropped": sorted(t for t, k in counts.items() if k < min_count)[:100],
                "thresholds": [0.5] * len(tags)}

    @property
    def tags(self) -> list[str]:
        return self.state["tags"]

    @property
    def width(self) -> int:
        return len(self.tags)

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.state["thresholds"], np.float64)

    def encode(self, cells: Sequence[str]) -> np.ndarray:
        index = {t: i for i, t in enumerate(self.tags)}
        out = np.zeros((len(cells), self.width), np.float32)
        for row, cell in enumerate(cells):
            for t in json.loads(cell):
                if t in index:  # a tag below min_count is not predicted
                    out[row, index[t]] = 1.0
        return out

    def loss(self, train_params) -> torch.nn.Module:
        import torch
        return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(self.state["pos_weight"], dtype=torch.float32))

    def loss_sum(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        import torch
        weight = torch.tensor(self.state["pos_weight"], dtype=outputs.dtype, device=outputs.device)
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, encoded, pos_weight=weight,
                                                                    reduction="sum")

    def distill_loss(self, outputs: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        import torch
        # each tag's softened teacher probability as a soft binary target
        soft = torch.sigmoid(teacher / temperature)
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs / temperature, soft) * temperature ** 2

    def running(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        import torch
        predicted, truth = outputs >= 0, encoded >= 0.5  # probability >= 0.5 while training
        return torch.stack([(predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum()]).double()

    def from_running(self, sums: list[float], n: int) -> float:
        return f1_from_counts(*sums)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        import torch
        return torch.sigmoid(outputs.float())

    def headline(self, scores: np.ndarray, encoded: np.ndarray) -> float:
        predicted, truth = scores >= self.thresholds[None, :], encoded >= 0.5
        return f1_from_counts((predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum())

    def metrics(self, scores: np.ndarray, encoded: np.ndarray, ece_bins: int) -> dict[str, Any]:
        return multilabel(scores, encoded >= 0.5, self.thresholds, self.tags, ece_bins)

    def chance(self, encoded: np.ndarray) -> float:
        share = float((encoded >= 0.5).mean()) if encoded.size else 0.0
        return 2 * share / (1 + share)  # micro-F1 of answering every tag

    def fit_on_val(self, scores: np.ndarray, encoded: np.ndarray) -> dict[str, Any]:
        """Each tag's threshold: the grid value with the best F1 of that tag on the validation split (ties: the
        one nearest 0.5); 0.5 for a tag without validation positives."""
        truth, thresholds = encoded >= 0.5, []
        for k in range(self.width):
            if not truth[:, k].any():
                thresholds.append(0.5)
                continue
            f1 = [f1_from_counts(*(((scores[:, k] >= t) & truth[:, k]).sum(), ((scores[:, k] >= t) & ~truth[:, k]).sum(),
                                   ((scores[:, k] < t) & truth[:, k]).sum())) for t in THRESHOLD_GRID]
            best = max(range(len(f1)), key=lambda i: (f1[i], -abs(THRESHOLD_GRID[i] - 0.5)))
            thresholds.append(float(THRESHOLD_GRID[best]))
        return {"thresholds": thresholds}

    def answer(self, scores_row: np.ndarray) -> dict[str, Any]:
        return {"tags": [t for t, p, thr in zip(self.tags, scores_row, self.thresholds) if p >= thr],
                "scores": {t: round(float(p), 6) for t, p in zip(self.tags, scores_row)}}

    def agree(self, a: dict[str, Any], b: dict[str, Any], between_models: bool = False) -> bool:
        return a.get("tags") == b.get("tags")

    def score_answers(self, answers: list[dict[str, Any]], encoded: np.ndarray) -> float:
        index = {t: i for i, t in enumerate(self.tags)}
        predicted = np.zeros(encoded.shape, bool)  # an unread row: no tag
        for row, a in enumerate(answers):
            predicted[row, [index[t] for t in a.get("tags", []) if t in index]] = True
        truth = encoded >= 0.5
        return f1_from_counts((predicted & truth).sum(), (predicted & ~truth).sum(), (~predicted & truth).sum())

    # set-level guarantee: the set holds every true tag (score: the least probable true tag's 1 - p; a row
    # without tags is always covered). Per-tag guarantees would promise each tag's recall, not the row's.
    CONFORMAL_SCORE = "all_true_tags"

    def probabilities(self, outputs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        from scipy.special import expit
        return expit(np.asarray(outputs, np.float64) / temperature)

    def nll(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> float:
        from scipy.special import log_expit
        z, truth = np.asarray(outputs, np.float64) / temperature, np.asarray(encoded) >= 0.5
        return float(-np.mean(np.where(truth, log_expit(z), log_expit(-z)).sum(axis=1)))  # unweighted: probabilities

    def nonconformity(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        p = self.probabilities(outputs, temperature)
        return np.where(np.asarray(encoded) >= 0.5, 1.0 - p, 0.0).max(axis=1, initial=0.0)

    def prediction_sets(self, outputs: np.ndarray, temperature: float, threshold: np.ndarray) -> np.ndarray:
        return self.probabilities(outputs, temperature) >= 1.0 - np.asarray(threshold)[:, None] - SET_TOLERANCE

    def covers(self, sets: np.ndarray, encoded: np.ndarray) -> np.ndarray:
        return ~((np.asarray(encoded) >= 0.5) & ~sets).any(axis=1)

    def reliability(self, probabilities: np.ndarray, encoded: np.ndarray, bins: int) -> tuple[float, list[dict]]:
        return binary_calibration(probabilities, np.asarray(encoded) >= 0.5, bins)

    def covered_by(self, answer: dict[str, Any], encoded_row) -> bool:
        truth = {t for t, on in zip(self.tags, np.asarray(encoded_row) >= 0.5) if on}
        return "error" not in answer and truth <= set(answer.get("prediction_set", ()))
