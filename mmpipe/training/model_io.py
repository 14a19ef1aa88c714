"""A trained model on disk (config.json + model.safetensors) and the tensors it takes.

Here, not in the trainer: evaluate, compress and export load models and feed them but never train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmpipe.modalities import build_encoder
from mmpipe.modalities.base import array_names
from mmpipe.models.fusion import FusionModel
from mmpipe.names import CONFIG_FILE, WEIGHTS_FILE, available_key
from mmpipe.targets import Target, target_of
from mmpipe.trust.calibration import subsets


def model_config(modalities: list[str], states: dict[str, dict], model_params: dict[str, Any],
                 target: Target | list[str]) -> dict[str, Any]:
    """The JSON config of a model: its modalities, their fitted state (what their encoders are built
    from), the model params (a JSON-able mapping), the target (type, options, fitted state; a list: the
    classes of a category target), the head's outputs, and the class names or tags the outputs stand for
    ([] for a number)."""
    if isinstance(target, (list, tuple)):
        target = target_of({"type": "category", "column": "label", "state": {"labels": list(target)}})
    names = target.state.get("labels") or target.state.get("tags") or []
    return {"modalities": list(modalities), "labels": list(names), "model": dict(model_params),
            "outputs": target.width, "target": target.describe(), "states": {m: states[m] for m in modalities}}


def target_of_model(config: dict[str, Any]) -> Target:
    """The target a model was trained for (a model from before targets were declared: its classes)."""
    return target_of(config.get("target") or {"type": "category", "column": "label",
                                              "state": {"labels": config["labels"]}})


def build_model(config: dict[str, Any]) -> FusionModel:
    """The fusion model ``config`` describes, freshly initialised: each modality's encoder from its
    module's factory (built first, in the model's modality order: the seeded initialisation depends on it)."""
    encoders = {m: build_encoder(m, config["states"][m], config["model"]) for m in config["modalities"]}
    # each encoder takes its modality's arrays positionally, in the featurizer's order
    arrays = {m: array_names(config["states"][m]) for m in config["modalities"]}
    return FusionModel(config, encoders, arrays)


def save_model(folder: Path, weights: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_model(folder: Path):
    """Rebuild a trained model from ``folder`` (config.json + model.safetensors), in eval mode."""
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = build_model(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.target = target_of_model(config)  # what its outputs mean (scores, headline, thresholds)
    return model.eval()


def to_model_inputs(batch: dict[str, torch.Tensor], modalities: list[str], device: torch.device) -> dict:
    """A loader batch on ``device``, with ``available`` (B, len(modalities)): the availability of
    ``modalities``, in that order (the loader keeps one column per modality of the data)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if not k.startswith("available.")}
    moved["available"] = torch.stack([batch[available_key(m)] for m in modalities], dim=1).to(device, non_blocking=True)
    return moved


def only_available(batch: dict[str, torch.Tensor], modalities: list[str], subset) -> dict[str, torch.Tensor]:
    """``batch`` with every modality of ``modalities`` outside ``subset`` marked unavailable (missing-modality
    evaluation, calibration per availability pattern)."""
    return batch | {available_key(m): torch.zeros_like(batch[available_key(m)]) for m in modalities if m not in subset}


@torch.no_grad()
def subset_outputs(model: torch.nn.Module, tensors: dict, device: torch.device,
                   batch_size: int = 512) -> dict[tuple[str, ...], np.ndarray]:
    """Raw outputs with only each subset of the model's modalities available (where the row has it), the empty
    subset (nothing available: the model's prior) included. The encoders run once per batch (``encode``); only
    the fusion and the head run per subset (``fuse``): what masking the inputs would give, 2^M times cheaper."""
    model.eval()
    chosen = [(), *subsets(model.modalities)]
    out: dict[tuple[str, ...], list[np.ndarray]] = {s: [] for s in chosen}
    for start in range(0, len(tensors["label"]), batch_size):
        inputs = to_model_inputs({k: v[start:start + batch_size] for k, v in tensors.items()}, model.modalities, device)
        encoded, available = model.encode(inputs), inputs["available"].bool()
        for subset in chosen:
            keep = torch.tensor([m in subset for m in model.modalities], device=device)
            out[subset].append(model.fuse(encoded, available & keep).float().cpu().numpy())
    return {subset: np.concatenate(parts) for subset, parts in out.items()}
