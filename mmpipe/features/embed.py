"""The embedding cache: a frozen pretrained backbone run once over a modality's feature shards.

``preprocess.<m>.embed: true`` with a pretrained ``model.encoders.<m>.arch`` whose every block is
frozen (``freeze: all``) and whose weights are a local file: the backbone's pooled output for each
available sample is written as ``embedding-NNNNN.npy`` (float16, (rows, E)) beside the raw shards,
batched, on the GPU when present (bf16 autocast there). ``train`` then fits the projection, fusion
and head on these vectors, seconds per epoch even on a CPU, and the trained model still takes the
raw arrays (its backbone is the weights file's), so evaluate, compress and export are unchanged.
Unavailable rows stay zero (never read: the model uses its placeholder there).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmpipe.errors import PipelineError
from mmpipe.modalities import build_encoder
from mmpipe.modalities.base import array_names
from mmpipe.names import EMBEDDING_ARRAY, shard_path


def frozen_backbone(modality: str, state: dict, model_params) -> tuple[torch.nn.Module, dict]:
    """The encoder ``model.encoders.<modality>`` builds, its weights loaded, in eval mode; one line when
    it is not a backbone that can be cached (small_cnn, blocks left trainable, no weights file); and what
    ``load_pretrained`` loaded."""
    cfg = getattr(model_params.encoders, modality)
    field = f"preprocess.{modality}.embed"
    if cfg.arch == "small_cnn":
        raise PipelineError(f"{field} caches a pretrained backbone's output: set model.encoders.{modality}.arch "
                            f"(now small_cnn) to one (README: Using pretrained encoders), or embed: false")
    if cfg.freeze != "all":
        raise PipelineError(f"{field} needs model.encoders.{modality}.freeze: all (now {cfg.freeze}): "
                            f"a backbone that trains changes its output, so it cannot be cached")
    if cfg.weights is None:
        raise PipelineError(f"{field} needs model.encoders.{modality}.weights (a local weights file): "
                            f"a frozen randomly initialised backbone is not worth caching")
    encoder = build_encoder(modality, state, model_params.model_dump())
    info = encoder.load_pretrained()
    return encoder.eval(), info


def cache_embeddings(modality: str, state: dict, folder: Path, available: np.ndarray, model_params,
                     batch_size: int, device: str) -> tuple[dict, dict]:
    """Write ``folder``'s embedding shards from its raw shards (``state`` as preprocess wrote it);
    return (what goes in state.json under ``embedding``, metrics)."""
    started = time.perf_counter()
    encoder, info = frozen_backbone(modality, state, model_params)
    encoder.to(device)
    width = encoder.out.in_features
    names = array_names(state)
    rows_per_shard = state["shard_rows"]
    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    done = 0
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=compute, enabled=compute != torch.float32), \
            tqdm(total=int(available.sum()), desc=f"embed {modality}", unit="sample", disable=None) as progress:
        for k in range(state["shards"]):
            shard = {name: np.load(shard_path(folder, name, k), mmap_mode="r") for name in names}
            first = k * rows_per_shard
            rows = len(shard[names[0]])
            out = np.zeros((rows, width), np.float16)
            present = np.flatnonzero(available[first:first + rows])
            for start in range(0, len(present), batch_size):
                pick = present[start:start + batch_size]
                inputs = [torch.from_numpy(np.ascontiguousarray(shard[name][pick])).to(device) for name in names]
                out[pick] = encoder.embed(*inputs).float().cpu().numpy()
                progress.update(len(pick))
                done += len(pick)
            np.save(shard_path(folder, EMBEDDING_ARRAY, k), out)
    seconds = time.perf_counter() - started
    cached = {"shape": [width], "dtype": "float16", "arch": info["arch"], "weights": info["weights"],
              "sha256": info["sha256"], "device": device, "compute_dtype": str(compute).removeprefix("torch.")}
    metrics = {"samples": done, "device": device, "seconds": round(seconds, 3),
               "samples_per_s": round(done / seconds, 1) if seconds > 0 else None,
               "bytes": sum(shard_path(folder, EMBEDDING_ARRAY, k).stat().st_size for k in range(state["shards"]))}
    return cached, metrics
