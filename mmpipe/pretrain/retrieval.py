"""Cross-modal retrieval over normalised embeddings: recall@k and median rank of the true match, and
a top-k search. numpy only: shipped in the deployment bundle (predict.py's ``search``) as is."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)
CHUNK = 1024  # query rows per similarity block: memory stays CHUNK x gallery rows, whatever the split size


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def true_match_ranks(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """The rank (1 = first) of gallery row i among all gallery rows for query row i, by cosine similarity.
    Ties count against the match (a gallery row as similar as the true one ranks ahead of it), so
    constant embeddings rank last, not first."""
    queries, gallery = normalise(queries), normalise(gallery)
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ gallery.T
        rows = np.arange(sims.shape[0])
        true = sims[rows, start + rows]
        ranks[start:start + CHUNK] = (sims >= true[:, None]).sum(axis=1)  # counts the match itself: 1-based
    return ranks


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray, ks=KS) -> dict[str, float]:
    """recall@k (share of queries whose true match is in the top k), the median rank and, for
    reference, chance at each k (k / gallery rows) of row-aligned ``queries`` and ``gallery``."""
    ranks = true_match_ranks(queries, gallery)
    n = len(ranks)
    out: dict[str, float] = {"rows": n}
    for k in ks:
        out[f"recall@{k}"] = round(float((ranks <= k).mean()), 4) if n else 0.0
    out["median_rank"] = float(np.median(ranks)) if n else 0.0
    for k in ks:
        out[f"chance@{k}"] = round(min(1.0, k / n), 4) if n else 0.0
    return out


def search(index: np.ndarray, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``index`` most similar (cosine) to each query: (positions (Q, k), similarities
    (Q, k)), best first; equal similarities in index order."""
    index, queries = normalise(index), normalise(np.atleast_2d(queries))
    k = max(0, min(int(k), len(index)))
    positions = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), CHUNK):
        sims = queries[start:start + CHUNK] @ index.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        positions[start:start + CHUNK] = order
        scores[start:start + CHUNK] = np.take_along_axis(sims, order, axis=1)
    return positions, scores
