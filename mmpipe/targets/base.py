"""The written interface of a target type (what the model predicts), and what every type shares.

A target type turns the user's target cells into what the network learns and back: ``parse`` checks one
cell (a bad one raises ``BadTarget``: clean rejects that row with the reason), ``fit`` learns its state
from the train split, ``encode`` makes the tensors the loss sees, ``width`` sizes the head, ``loss`` is the
training criterion, ``scores`` turns network outputs into what users read (probabilities, a value in
their units, per-tag probabilities), ``metrics`` / ``headline`` judge them, and ``answer`` writes one
prediction as the bundle's predictor returns it.

The canonical cell (what clean stores in the ``label`` column) is text for every type: a class name, a
number written with ``repr`` (round-trips exactly), a set as a sorted JSON list. ``""`` is a row without a
target: kept (unlabelled), excluded from supervised training and evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: clean parses cells in processes that never need it
    import torch

UNLABELLED = ""


class BadTarget(ValueError):
    """A target cell that cannot be read: ``code`` (a reject code) and a one-line ``reason``."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Target:
    """A target type with its options (``spec``: data.target as collect recorded it) and, once fitted, its
    state (``spec["state"]``). Subclasses set NAME, HEADLINE (the metric every later stage uses: higher is
    better) and implement the methods that raise NotImplementedError."""

    NAME = ""
    HEADLINE = ""
    RUNNING_SIZE = 1  # length of ``running``'s sums
    TUNES_ON_VAL = False  # ``fit_on_val`` learns something

    def __init__(self, spec: dict[str, Any]):
        self.spec = dict(spec)
        self.state: dict[str, Any] = dict(spec.get("state") or {})

    # ---------------------------------------------------------------- clean: cells and state
    def parse(self, cell: str | None) -> str:
        """The canonical text of one raw cell; ``UNLABELLED`` for an empty one; ``BadTarget`` if unreadable."""
        raise NotImplementedError

    def fit(self, train_cells: Sequence[str], kept_cells: Sequence[str]) -> dict[str, Any]:
        """The state learnt from the labelled train cells (``kept_cells``: every kept labelled cell, for
        what is not learnt but listed, e.g. the classes)."""
        raise NotImplementedError

    def fitted(self, state: dict[str, Any]) -> "Target":
        return type(self)({**self.spec, "state": state})

    def describe(self) -> dict[str, Any]:
        """The JSON the later stages rebuild this target from (type, options, state)."""
        return {**self.spec, "state": self.state}

    # ---------------------------------------------------------------- train: tensors, head, loss
    @property
    def width(self) -> int:
        """Outputs of the network's head."""
        raise NotImplementedError

    def encode(self, cells: Sequence[str]) -> np.ndarray:
        """What the loss compares the outputs with, one row per (labelled) cell."""
        raise NotImplementedError

    def loss(self, train_params) -> torch.nn.Module:
        raise NotImplementedError

    def loss_sum(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        """The summed validation loss (no label smoothing, no augmentation) of a batch."""
        raise NotImplementedError

    def distill_loss(self, outputs: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """Mean knowledge-distillation loss of a student's raw ``outputs`` against a teacher's on the same inputs
        (compress.distill): the teacher's soft targets at ``temperature``, or its prediction for a number."""
        raise NotImplementedError

    def running(self, outputs: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        """Sums (float64, on the outputs' device: no host sync) from which ``from_running`` gives the headline
        over an epoch of batches; on the model's scale."""
        raise NotImplementedError

    def from_running(self, sums: list[float], n: int) -> float:
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluate and serve
    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """What users read from network outputs: class probabilities (n, K), values in their units (n,),
        per-tag probabilities (n, K)."""
        raise NotImplementedError

    def headline(self, scores: np.ndarray, encoded: np.ndarray) -> float:
        raise NotImplementedError

    def metrics(self, scores: np.ndarray, encoded: np.ndarray, ece_bins: int) -> dict[str, Any]:
        """{"summary": flat metrics (the headline among them), "per_class" or "per_tag": a table, and the tables
        behind the plots}."""
        raise NotImplementedError

    def chance(self, encoded: np.ndarray) -> float:
        """The headline of the best constant answer on these targets: what "learnt nothing" scores."""
        raise NotImplementedError

    def fit_on_val(self, scores: np.ndarray, encoded: np.ndarray) -> dict[str, Any]:
        """State tuned on the validation split after training (set: per-tag thresholds); {} = nothing."""
        return {}

    def answer(self, scores_row: np.ndarray) -> dict[str, Any]:
        """One prediction as the predictor returns it."""
        raise NotImplementedError

    def agree(self, a: dict[str, Any], b: dict[str, Any], between_models: bool = False) -> bool:
        """Whether two answers for the same input agree: parity checks (the same model on two paths) or, with
        ``between_models``, two models (int8 vs fp32: a number then within a looser tolerance)."""
        raise NotImplementedError

    def agreement(self, outputs_a: np.ndarray, outputs_b: np.ndarray, between_models: bool = False) -> np.ndarray:
        """Row by row, whether two raw outputs give agreeing answers (class: the same top-1; number: within
        ``tolerance``; set: the same tags)."""
        import torch
        scores_a, scores_b = (self.scores(torch.from_numpy(np.asarray(o, np.float32))).numpy() for o in (outputs_a, outputs_b))
        return np.array([self.agree(self.answer(x), self.answer(y), between_models) for x, y in zip(scores_a, scores_b)],
                        bool)

    def score_answers(self, answers: list[dict[str, Any]], encoded: np.ndarray) -> float:
        """The headline metric of answers as a predictor gives them (``answer``'s form; ``{"error"}`` for a row
        it could not read: scored as the answer of a model that learnt nothing)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- trust (mmpipe/trust): numpy, raw outputs
    # ``outputs`` are the network's raw outputs (n, width), float64; ``temperature`` divides logits (category,
    # set: temperature scaling); a number has none (its interval is its calibration).
    TEMPERATURE = True  # outputs are logits that a temperature can scale
    CONFORMAL_SCORE = ""  # what the conformal threshold bounds (docs/architecture.md: "How far to trust it")

    def probabilities(self, outputs: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Class or tag probabilities of raw outputs at ``temperature`` (not for a number)."""
        raise NotImplementedError

    def nll(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> float:
        """Mean negative log-likelihood per row (what temperature scaling minimises; a number: Gaussian with
        unit variance on the standardised scale)."""
        raise NotImplementedError

    def nonconformity(self, outputs: np.ndarray, encoded: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """Per row, how far the truth is from being predicted: the split-conformal score, (n,)."""
        raise NotImplementedError

    def prediction_sets(self, outputs: np.ndarray, temperature: float, threshold: np.ndarray) -> np.ndarray:
        """Per row, the conformal answer at that row's score ``threshold`` (inf: everything): a bool (n, width)
        membership of classes or tags, or an (n, 2) interval in the user's units."""
        raise NotImplementedError

    def covers(self, sets: np.ndarray, encoded: np.ndarray) -> np.ndarray:
        """Per row, whether the prediction set holds the truth, (n,) bool."""
        raise NotImplementedError

    def reliability(self, probabilities: np.ndarray, encoded: np.ndarray, bins: int) -> tuple[float, list[dict]]:
        """Expected calibration error and reliability table of ``probabilities`` (not for a number)."""
        raise NotImplementedError

    def set_answer(self, set_row: np.ndarray) -> list:
        """One row of ``prediction_sets`` as the predictor answers it: class names or tags; [low, high]
        (None: unbounded)."""
        names = self.state.get("labels") or self.state.get("tags")
        return [n for n, on in zip(names, set_row) if on]

    def covered_by(self, answer: dict[str, Any], encoded_row) -> bool:
        """Whether a predictor answer's set/interval holds the truth (an error row: no)."""
        raise NotImplementedError

    def same_set(self, a, b) -> bool:
        """Whether two sets (``set_answer``'s form) agree (intervals: within the parity tolerance)."""
        return a == b

    def set_sizes(self, sets: np.ndarray) -> np.ndarray:
        """Per row, the size of the prediction set (classes, tags) or the width of the interval (user units)."""
        return sets.sum(axis=1).astype(np.float64)


# a score threshold compares with 1 - p: a row scored exactly q is in its own set despite float rounding
SET_TOLERANCE = 1e-9


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn > 0 else 1.0
