"""The bundle's aligned embeddings (``predict.py --embed`` / ``--index`` / ``--search``): the pretrain stage's
encoders and projection heads as one ONNX graph, checked against PyTorch on the features and against the
pipeline on the raw test files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmpipe.compress.onnx_model import export_onnx, input_dtypes, onnx_feeds, session
from mmpipe.features.loader import FeatureSet
from mmpipe.pretrain.align import AlignmentModel, load_aligned

EMBED_FILE = "embed.onnx"
EXPORT_EXAMPLE_ROWS = 8


class EmbeddingArgsModel(nn.Module):
    """The aligned encoders with positional tensor inputs (the arrays of every modality, in the bundle's order;
    no availability: each modality is embedded, the predictor keeps those the sample has) -> (B, M, dim)."""

    def __init__(self, model: AlignmentModel):
        super().__init__()
        self.model = model
        self.names = [name for name in input_dtypes(model) if name != "available"]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        embedded = self.model.embed(dict(zip(self.names, tensors)))
        return torch.stack([embedded[m] for m in self.model.modalities], dim=1)


@torch.no_grad()
def ship_embeddings(out: Path, aligned_dir: Path | None, model, test: FeatureSet, samples: int) -> dict[str, Any]:
    """Write ``embed.onnx`` into the bundle ``out`` when the pretrain stage ran, checked on ``samples`` test rows
    against the PyTorch embeddings. Returns its manifest entry under "manifest" and the checks."""
    aligned = load_aligned(aligned_dir) if aligned_dir is not None else None
    if aligned is None:
        return {"shipped": False, "why": "pretrain.enabled was false: nothing is aligned"}
    if list(aligned.modalities) != list(model.modalities):
        return {"shipped": False, "why": f"the aligned modalities ({', '.join(aligned.modalities)}) are not the "
                                         f"model's ({', '.join(model.modalities)})"}
    wrapper = EmbeddingArgsModel(aligned)
    # the graph from a fixed example (its bytes must not depend on export.parity_samples), checked on `samples` rows
    export_onnx(aligned, onnx_feeds(test.get(np.arange(min(len(test), EXPORT_EXAMPLE_ROWS))), model), out / EMBED_FILE,
                wrapper=wrapper, output="embeddings")
    feeds = onnx_feeds(test.get(np.arange(min(len(test), samples))), model)
    onnx_vectors = session(out / EMBED_FILE).run(["embeddings"], {name: feeds[name] for name in wrapper.names})[0]
    torch_vectors = wrapper(*(torch.from_numpy(feeds[name]) for name in wrapper.names)).numpy()
    return {"shipped": True, "file_bytes": (out / EMBED_FILE).stat().st_size,
            "onnx_vs_pytorch_max_abs_diff": float(np.abs(onnx_vectors - torch_vectors).max()),
            "manifest": {"file": EMBED_FILE, "inputs": wrapper.names, "modalities": list(aligned.modalities),
                         "dim": int(torch_vectors.shape[-1]), "loss": aligned.loss,
                         "commands": ["python predict.py --embed ...", "python predict.py --manifest M.csv --index I.npz",
                                      "python predict.py --search I.npz --among <modality|fused> ..."]}}


def raw_file_agreement(predictor, model, test: FeatureSet, items: list[dict], samples: int) -> dict[str, float]:
    """The bundle predictor's embeddings of raw test files against the pipeline's ONNX embeddings of the same rows'
    features: the smallest cosine over the rows and the modalities they have (1.0: the same vectors)."""
    rows = list(range(min(len(items), samples)))
    feeds = onnx_feeds(test.get(np.array(rows, dtype=np.int64)), model)
    spec = predictor.manifest["embed"]
    pipeline = session(predictor.folder / spec["file"]).run(["embeddings"], {n: feeds[n] for n in spec["inputs"]})[0]
    worst, compared = 1.0, 0
    for i in rows:
        try:
            answer = predictor.embed([predictor.features(**items[i])])[0]
        except predictor.InputError:
            continue
        for m, vector in answer["embeddings"].items():
            worst = min(worst, float(np.dot(vector, pipeline[i, spec["modalities"].index(m)])))
            compared += 1
    return {"raw_test_min_cosine": round(worst, 6), "raw_test_vectors_compared": compared}
