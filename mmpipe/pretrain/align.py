"""Contrastive alignment of the modalities on unlabelled pairs: the encoders ``train`` builds, each with a
small projection head, trained so that the modalities of one sample land close together and those of
different samples apart — on every row of the train split, labelled or not (a photo and its caption are
a free training signal; labels are the expensive part).

Losses (``pretrain.loss``): ``siglip`` — the pairwise sigmoid loss of SigLIP (Zhai et al. 2023), every
(i, j) pair of the batch a binary "same sample?" question with a learned scale and bias: it needs no
softmax over the batch, so small batches work; ``infonce`` — CLIP's symmetric cross-entropy over the
batch. Each modality pair of a batch is scored on the rows that have both, and the pairs' losses
averaged, so a sample missing one modality still aligns the others.

``pretrain()`` writes ``aligned.safetensors`` (encoders + projections + scale/bias) and ``config.json``;
``load_aligned_encoders`` copies the encoders into a fresh fusion model (``model.init: pretrained``), and
``load_aligned`` / ``embed_split`` give evaluate and export the aligned embeddings (retrieval, ``--embed``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from mmpipe.device import resolve_device, seed_everything
from mmpipe.errors import PipelineError
from mmpipe.features.loader import FeatureSet
from mmpipe.modalities import build_encoder
from mmpipe.modalities.base import array_names
from mmpipe.models.fusion import encode_modality, load_pretrained
from mmpipe.names import available_key
from mmpipe.pretrain.retrieval import retrieval_metrics
from mmpipe.training.optim import param_groups, warmup_cosine

ALIGNED_FILE, CONFIG_FILE = "aligned.safetensors", "config.json"
LOSSES = ("siglip", "infonce")
MAX_SCALE = 100.0  # CLIP's clamp of the learned logit scale


class AlignmentModel(nn.Module):
    """One encoder per modality (as the fusion model builds them) and a projection head each, into a shared
    space of ``proj_dim`` where the embeddings are compared by cosine."""

    def __init__(self, encoders: dict[str, nn.Module], arrays: dict[str, list[str]], dim: int, proj_dim: int,
                 loss: str):
        super().__init__()
        self.modalities = list(encoders)
        self.encoders = nn.ModuleDict(encoders)
        self.arrays = arrays
        # a two-layer head (SimCLR: the layer before a non-linear head keeps more of what the task needs)
        self.projections = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                                           nn.Linear(dim, proj_dim)) for m in self.modalities})
        self.loss = loss
        # SigLIP's initialisation (t = 10, b = -10: most pairs are negatives); CLIP's temperature 0.07 for InfoNCE
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0 if loss == "siglip" else 1 / 0.07)))
        self.bias = nn.Parameter(torch.tensor(-10.0 if loss == "siglip" else 0.0), requires_grad=loss == "siglip")

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's unit-length embedding (B, proj_dim), available or not (the caller masks)."""
        return {m: F.normalize(self.projections[m](encode_modality(self.encoders[m], self.arrays[m], batch, m)).float(),
                               dim=-1)
                for m in self.modalities}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The alignment loss of a batch: the mean over modality pairs that two rows of it have in common."""
        embedded = self.embed(batch)
        scale = self.log_scale.clamp(max=math.log(MAX_SCALE)).exp()
        losses = []
        for a, b in itertools.combinations(self.modalities, 2):
            both = batch[available_key(a)].bool() & batch[available_key(b)].bool()
            if int(both.sum()) >= 2:
                losses.append(pair_loss(embedded[a][both], embedded[b][both], scale, self.bias, self.loss))
        if not losses:  # no pair in this batch: a zero that still reaches every parameter (DDP-safe, no NaN)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        return torch.stack(losses).mean()


def pair_loss(za: torch.Tensor, zb: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """The contrastive loss of two modalities' unit embeddings of the same n rows (row i of each: a pair)."""
    logits = scale * za @ zb.T
    if kind == "siglip":  # each (i, j) a binary question; normalised by n as in the paper
        signs = 2 * torch.eye(len(za), device=za.device) - 1
        return -F.logsigmoid(signs * (logits + bias)).sum() / len(za)
    target = torch.arange(len(za), device=za.device)  # InfoNCE, symmetric (a -> b and b -> a)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def build_alignment_model(states: dict[str, dict], model_params: dict[str, Any], modalities: list[str],
                          proj_dim: int, loss: str) -> AlignmentModel:
    """The encoders exactly as ``build_model`` builds them for these modalities (their factories, in this
    order), and the heads. Reads only ``model.dim``, ``model.augment`` and ``model.encoders``."""
    encoders = {m: build_encoder(m, states[m], model_params) for m in modalities}
    return AlignmentModel(encoders, {m: array_names(states[m]) for m in modalities}, model_params["dim"], proj_dim,
                          loss)


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def embed_split(model: AlignmentModel, data: FeatureSet, device: torch.device,
                batch_size: int = 512) -> dict[str, np.ndarray]:
    """Each modality's aligned embeddings (rows, proj_dim) of every row of ``data`` (eval mode)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
    for batch in data.batches(batch_size):
        for m, vectors in model.embed(_on(batch, device)).items():
            parts[m].append(vectors.cpu().numpy())
    return {m: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for m, v in parts.items()}


def pairwise_retrieval(embedded: dict[str, np.ndarray], available: np.ndarray,
                       modalities: list[str]) -> dict[str, dict[str, float]]:
    """Retrieval metrics for every ordered modality pair "a->b" (query a, gallery b) on the rows having both."""
    out = {}
    for a, b in itertools.permutations(modalities, 2):
        both = available[:, modalities.index(a)] & available[:, modalities.index(b)]
        out[f"{a}->{b}"] = retrieval_metrics(embedded[a][both], embedded[b][both])
    return out


def mean_recall(pairs: dict[str, dict[str, float]], k: int = 1) -> float:
    values = [p[f"recall@{k}"] for p in pairs.values() if p["rows"]]
    return float(np.mean(values)) if values else 0.0


def pretrain(params, model_params, features_root: Path, out_dir: Path,
             on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Align every modality pair on all train rows (labelled or not); keep the epoch with the best mean
    validation recall@10 over the ordered pairs; write it to ``out_dir``; return the metrics."""
    started = time.perf_counter()
    device = torch.device(resolve_device(params.device, "pretrain.device"))
    if params.threads:
        torch.set_num_threads(params.threads)
    seed_everything(params.seed, device)
    train_set = FeatureSet(features_root, split="train", embeddings=True, labelled=False)
    val_set = FeatureSet(features_root, split="val", embeddings=True, labelled=False)
    modalities = list(train_set.modalities)
    if len(modalities) < 2:
        raise PipelineError(f"pretrain: the data has one modality ({modalities[0]}): there is nothing to align "
                            f"it with; set pretrain.enabled: false")
    model_dict = model_params.model_dump()
    model = build_alignment_model(train_set.state, model_dict, modalities, params.proj_dim, params.loss)
    backbones = load_pretrained(model)  # local weight files into the backbones that have them (frozen parts kept)
    model.to(device)
    batch_size = min(params.batch_size, len(train_set))
    steps_per_epoch = max(1, len(train_set) // batch_size)  # full batches only: a pair loss over 3 rows is noise
    optimizer = torch.optim.AdamW(param_groups(model, params.lr), lr=params.lr, weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(int(steps_per_epoch * params.warmup_epochs), steps_per_epoch * params.epochs))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    best = {"score": -math.inf, "epoch": -1, "state": None, "val": {}}
    history, stalled = [], 0
    for epoch in range(params.epochs):
        if stalled >= params.patience:
            break
        tic = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for batch in train_set.batches(batch_size, shuffle=True, seed=params.seed * 100_003 + epoch, drop_last=True):
            with torch.autocast(**amp):
                loss = model(_on(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach().double() * len(batch["index"])
            seen += len(batch["index"])
        val = pairwise_retrieval(embed_split(model, val_set, device), val_set.available, modalities)
        row = {"epoch": epoch, "train_loss": loss_sum.item() / max(seen, 1), "val_recall@1": mean_recall(val, 1),
               "val_recall@5": mean_recall(val, 5), "val_recall@10": mean_recall(val, 10),
               "scale": float(model.log_scale.detach().exp()), "lr": schedule.get_last_lr()[0],
               "samples_per_s": seen / (time.perf_counter() - tic)}
        history.append(row)
        if on_epoch:
            on_epoch(epoch, row)
        if row["val_recall@10"] > best["score"]:  # @10: steadier than @1 on a small validation split
            best = {"score": row["val_recall@10"], "epoch": epoch, "val": val,
                    "state": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}}
            stalled = 0
        else:
            stalled += 1
    config = {"enabled": True, "modalities": modalities, "model": model_dict,
              "states": {m: train_set.state[m] for m in modalities}, "proj_dim": params.proj_dim, "loss": params.loss}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(best["state"], str(out_dir / ALIGNED_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    seconds = time.perf_counter() - started
    metrics = {"enabled": True, "loss": params.loss, "modalities": modalities,
               "rows": {"train": len(train_set), "val": len(val_set),
                        "train_unlabelled": train_set.unlabelled},
               "best_epoch": best["epoch"], "epochs_run": len(history), "val_mean_recall@1": mean_recall(best["val"], 1),
               "val_mean_recall@5": mean_recall(best["val"], 5), "val_mean_recall@10": best["score"], "val": best["val"],
               "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1),
               "samples_per_s": round(sum(r["samples_per_s"] for r in history) / max(len(history), 1), 1),
               "device": device.type}
    if backbones:
        metrics["pretrained_backbones"] = backbones
    return {"metrics": metrics, "history": history}


def write_disabled(out_dir: Path) -> None:
    """``pretrain.enabled: false``: a folder saying so (the same bytes every time: train does not re-run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps({"enabled": False}) + "\n")


def aligned_config(folder: Path) -> dict[str, Any]:
    """The pretrain stage's config.json ({"enabled": false} when it did not run), or {} when there is none."""
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def encoders_to_start_from(init: str, folder: Path) -> Path | None:
    """``model.init`` resolved: the pretrain folder whose aligned encoders train starts from, or None (scratch).
    auto: the aligned encoders when the pretrain stage ran (pretrain.enabled)."""
    if init == "scratch" or (init == "auto" and not aligned_config(folder).get("enabled")):
        return None
    return Path(folder)  # pretrained (load_aligned_encoders says so in one line when there are none)


def load_aligned(folder: Path) -> AlignmentModel | None:
    """The aligned encoders + projections the pretrain stage wrote (eval mode), or None when it was off."""
    config = aligned_config(folder)
    if not config.get("enabled"):
        return None
    model = build_alignment_model(config["states"], config["model"], config["modalities"], config["proj_dim"],
                                  config["loss"])
    model.load_state_dict(load_file(str(Path(folder) / ALIGNED_FILE)))
    model.config = config
    return model.eval()


def load_aligned_encoders(model: nn.Module, folder: Path, modalities: list[str]) -> dict[str, Any]:
    """Copy the aligned encoders of ``modalities`` into ``model`` (a fresh fusion model: ``model.init:
    pretrained``). Each must be the very encoder this model builds (same features state, ``model.dim`` and
    encoder params), else one line saying to re-run pretrain. Returns the file's sha256 and the modalities."""
    folder = Path(folder)
    config = aligned_config(folder)
    if not config.get("enabled"):
        raise PipelineError(f"model.init is pretrained but {folder} holds no aligned encoders "
                            f"(pretrain.enabled is false): set pretrain.enabled: true, or model.init: scratch")
    own = model.config
    for m in modalities:
        if m not in config["modalities"]:
            raise PipelineError(f"{folder}: has no aligned {m} encoder (aligned: {', '.join(config['modalities'])}): "
                                f"re-run the pretrain stage")
        same = (config["states"][m] == own["states"][m] and config["model"]["dim"] == own["model"]["dim"]
                and config["model"]["encoders"].get(m) == own["model"]["encoders"].get(m))
        if not same:
            raise PipelineError(f"{folder}: its {m} encoder was aligned with other features or model.encoders.{m} / "
                                f"model.dim than this model's: re-run the pretrain stage")
    state = load_file(str(folder / ALIGNED_FILE))
    for m in modalities:
        prefix = f"encoders.{m}."
        model.encoders[m].load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    digest = hashlib.sha256((folder / ALIGNED_FILE).read_bytes()).hexdigest()
    return {"from": str(folder), "sha256": digest, "modalities": list(modalities), "loss": config["loss"]}


def split_retrieval(folder: Path, features_root: Path, split: str, device: torch.device) -> dict[str, Any]:
    """Cross-modal retrieval on every row of ``split`` (labelled or not) from the aligned embeddings of the
    pretrain stage: recall@1/5/10, median rank and chance for every ordered modality pair, and the mean
    recall over pairs. ``{"enabled": False}`` when pretrain did not run (nothing is aligned)."""
    model = load_aligned(folder)
    if model is None:
        return {"enabled": False}
    data = FeatureSet(features_root, split=split, modalities=tuple(model.modalities), labelled=False)
    pairs = pairwise_retrieval(embed_split(model.to(device), data, device), data.available, model.modalities)
    return {"enabled": True, "loss": model.loss, "rows": len(data), "mean_recall@1": round(mean_recall(pairs, 1), 4),
            "mean_recall@5": round(mean_recall(pairs, 5), 4), "mean_recall@10": round(mean_recall(pairs, 10), 4),
            "pairs": pairs}
