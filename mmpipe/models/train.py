"""The training loop: one model (fusion or single-modality baseline) on the feature shards.

Read top to bottom: data -> model -> optimiser and schedule -> resume -> epochs (train, validate,
early stopping, checkpoint) -> best weights. Seeded; deterministic on CPU.

Under torchrun (see mmpipe.models.distributed) the same loop runs in every process with the model
wrapped in DistributedDataParallel: each rank trains on its shard of every epoch, rank 0 alone
validates (and shares the result, so every rank stops together) and writes checkpoints and outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmpipe.device import resolve_device
from mmpipe.features.loader import FeatureSet
from mmpipe.models import distributed
from mmpipe.models.fusion import build_model, drop_modalities, model_config
from mmpipe.models.model_io import save_model, to_model_inputs


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def rng_state(device: torch.device) -> dict:
    """Every random generator the loop may draw from, as tensors and plain data (safe to torch.load)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def data_digest(features_root: Path) -> str:
    """Identity of the feature sets (each modality's index and fitted state): a checkpoint resumes only
    on the very data it was trained on."""
    digest = hashlib.sha1()
    for folder in sorted(p for p in Path(features_root).iterdir() if p.is_dir()):
        for name in ("index.parquet", "state.json"):
            if (folder / name).exists():
                digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def clear_checkpoints(paths) -> None:
    """Remove the (finished) checkpoints of models whose outputs are now safely written."""
    for path in paths:
        if path is not None:
            Path(path).unlink(missing_ok=True)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: FeatureSet, modalities: list[str], device: torch.device,
             batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for batch in data.batches(batch_size):
        inputs = to_model_inputs(batch, modalities, device)
        correct += (model(inputs).argmax(dim=1) == inputs["label"]).sum().item()
    return correct / max(len(data), 1)


def train(params, model_params, features_root: Path, modalities: list[str], out_dir: Path | None,
          checkpoint_dir: Path | None, on_epoch: Callable[[int, dict], None] | None = None,
          init_model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train one model on ``modalities``; write weights + config to ``out_dir`` (rank 0); return metrics.

    ``init_model`` fine-tunes that model instead of a fresh one (the compress stage, after pruning);
    it is then returned with its best weights as ``result["model"]``. ``checkpoint_dir`` None: no resume.

    With ``checkpoint_dir``, every epoch saves everything needed to continue exactly (weights,
    optimiser, schedule, grad scaler, every RNG, history, best weights, early-stopping counter), and a
    finished model stays there as a *finished* checkpoint (``result["checkpoint"]``) until the caller
    has written its outputs and calls ``clear_checkpoints``: a stage killed while training a later
    model then reuses this one instead of training it again.
    """
    started = time.perf_counter()
    world = distributed.world()
    device = torch.device(resolve_device(params.device, "train.device"))
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    if params.threads:
        torch.set_num_threads(params.threads)
    seed_everything(params.seed, device)

    # data: every modality is loaded (so the availability mask is complete); the model uses its own
    train_set = FeatureSet(features_root, split="train")
    val_set = FeatureSet(features_root, split="val")
    if device.type == "cuda":  # small enough to live on the GPU: no host-to-device copies per batch
        train_set.to(device)
        val_set.to(device)

    config = model_config(modalities, train_set.state, model_params.model_dump(), train_set.label_names)
    model = (init_model if init_model is not None else build_model(config)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if world.size > 1:  # gradients averaged over the ranks
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        step_model = model
    step_model = torch.compile(step_model) if params.compile else step_model
    n_params = sum(p.numel() for p in model.parameters())

    # batch_size is the global batch: each of N processes takes 1/N of it, so the optimiser sees the same
    # steps (and the same lr schedule fits) however many processes torchrun starts
    rank_batch = math.ceil(params.batch_size / world.size)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world.size) / rank_batch)
    total_steps, warmup = steps_per_epoch * params.epochs, int(steps_per_epoch * params.warmup_epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(total_steps - warmup, 1)))))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and amp_dtype == torch.float16)

    # resume from the last epoch checkpoint of the same run (same config, params and data)
    name = "+".join(modalities)
    run_key = hashlib.sha1(json.dumps([config, params.model_dump(), data_digest(features_root)],
                                      sort_keys=True).encode()).hexdigest()[:16]
    checkpoint = checkpoint_dir / f"{name}-{run_key}.pt" if checkpoint_dir else None
    start_epoch, best, history, stalled = 0, {"val_accuracy": -1.0, "epoch": -1, "state": None}, [], 0
    seen = 0  # samples this process trained on (throughput)
    finished = None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # safe loading: tensors and plain data only
        if saved.get("finished"):
            finished, best, history = saved["metrics"], saved["best"], saved["history"]
            start_epoch = params.epochs  # nothing left to train
            if world.is_main:
                print(f"train[{name}]: already trained by an interrupted run of this stage ({checkpoint}): not retrained")
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            scaler.load_state_dict(saved["scaler"])
            set_rng_state(saved["rng"], device)
            start_epoch, best, history = saved["epoch"] + 1, saved["best"], saved["history"]
            stalled = saved["stalled"]
            if world.is_main:
                print(f"train[{name}]: resuming after epoch {saved['epoch']} from {checkpoint}")

    for epoch in range(start_epoch, params.epochs):
        if stalled >= params.patience:  # early stopping, checked first: a resumed run stops where the original did
            break
        step_model.train()
        epoch_loss, epoch_correct, epoch_n, tic = 0.0, 0, 0, time.perf_counter()
        if world.size > 1:  # each rank draws its own augmentation and modality dropout; per epoch, so resume is exact
            torch.manual_seed((params.seed * 100_003 + epoch) * world.size + world.rank)
        batches = train_set.batches(rank_batch, shuffle=True, seed=params.seed * 100_003 + epoch,
                                    shard=(world.rank, world.size))
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{'+'.join(modalities)} epoch {epoch}",
                   disable=None if world.is_main else True, leave=False)
        for batch in bar:
            inputs = to_model_inputs(batch, modalities, device)
            inputs["available"] = drop_modalities(inputs["available"], params.modality_dropout)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=device.type == "cuda"):
                logits = step_model(inputs)
                loss = loss_fn(logits.float(), inputs["label"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            n = len(inputs["label"])
            epoch_loss += loss.item() * n
            epoch_correct += (logits.argmax(dim=1) == inputs["label"]).sum().item()
            epoch_n += n
            bar.set_postfix(loss=f"{epoch_loss / epoch_n:.3f}", acc=f"{epoch_correct / epoch_n:.3f}",
                            samples_s=f"{epoch_n / (time.perf_counter() - tic):.0f}")
        epoch_loss, epoch_correct, epoch_n = distributed.all_sum([epoch_loss, epoch_correct, epoch_n], device)
        seen += epoch_n
        val_accuracy = distributed.from_main(accuracy(model, val_set, modalities, device) if world.is_main else 0.0,
                                             device)
        row = {"epoch": epoch, "train_loss": epoch_loss / epoch_n, "train_accuracy": epoch_correct / epoch_n,
               "val_accuracy": val_accuracy, "lr": schedule.get_last_lr()[0],
               "samples_per_s": epoch_n / (time.perf_counter() - tic)}
        history.append(row)
        if on_epoch and world.is_main:
            on_epoch(epoch, row)
        if val_accuracy > best["val_accuracy"]:
            best = {"val_accuracy": val_accuracy, "epoch": epoch,
                    # contiguous: channels-last conv weights (CUDA) are not, and safetensors needs it
                    "state": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}}
            stalled = 0
        else:
            stalled += 1
        if world.is_main and checkpoint is not None:
            _save(checkpoint, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                               "rng": rng_state(device), "epoch": epoch, "best": best, "history": history,
                               "stalled": stalled})

    if world.is_main and out_dir is not None:
        save_model(out_dir, best["state"], config)
    if finished is None:
        seconds = time.perf_counter() - started
        metrics = {"modalities": modalities, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
                   "epochs_run": len(history), "parameters": n_params, "seconds": round(seconds, 1),
                   "samples_per_s": round(seen / seconds, 1), "device": device.type, "processes": world.size}
        if device.type == "cuda":
            metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        metrics = finished
    if world.is_main and checkpoint is not None and finished is None:
        # kept (small: the best weights) until the caller's outputs are written: clear_checkpoints
        _save(checkpoint, {"finished": True, "best": best, "history": history, "metrics": metrics})
    result = {"metrics": metrics, "history": history, "checkpoint": checkpoint}
    if init_model is not None:
        model.load_state_dict(best["state"])
        result["model"] = model.cpu().eval()
    return result


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a kill leaves the previous checkpoint, never half of one
