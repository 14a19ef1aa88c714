"""The training loop: one model (fusion or single-modality baseline) on the feature shards.

``train()`` reads top to bottom as its steps: device and seeds -> data -> model -> optimiser and
schedule -> resume -> epochs (``train_epoch``, validate, early stopping, checkpoint) -> best weights and
metrics; each step is a named function below it. Seeded; deterministic on CPU.

Under torchrun (see mmpipe.training.distributed) the same loop runs in every process with the model
wrapped in DistributedDataParallel: each rank trains on its shard of every epoch, rank 0 alone
validates (and shares the result, so every rank stops together) and writes checkpoints and outputs.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmpipe.device import resolve_device, seed_everything
from mmpipe.errors import PipelineError
from mmpipe.features.loader import FeatureSet
from mmpipe.names import embedding_key, features_digest
from mmpipe.targets import Target
from mmpipe.training import distributed
from mmpipe.models.fusion import drop_modalities, load_pretrained
from mmpipe.pretrain.align import load_aligned_encoders
from mmpipe.training.distill import Teacher
from mmpipe.training.model_io import build_model, model_config, save_model, to_model_inputs
from mmpipe.training.optim import param_groups, warmup_cosine


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


def clear_checkpoints(paths) -> None:
    """Remove the (finished) checkpoints of models whose outputs are now safely written."""
    for path in paths:
        if path is not None:
            Path(path).unlink(missing_ok=True)


@torch.no_grad()
def score(model: torch.nn.Module, data: FeatureSet, modalities: list[str], device: torch.device,
          batch_size: int = 512, target: Target | None = None) -> dict[str, Any]:
    """The headline metric of the target (``data``'s: accuracy, r2, f1_micro; higher is better), the mean
    loss (no label smoothing) and the scores (``target.scores``, numpy) of ``model`` on ``data``."""
    target = target or data.target
    model.eval()
    loss, outputs = 0.0, []
    for batch in data.batches(batch_size):
        inputs = to_model_inputs(batch, modalities, device)
        out = model(inputs).float()
        loss += target.loss_sum(out, inputs["label"]).item()
        outputs.append(out.cpu())
    scores = target.scores(torch.cat(outputs)).numpy() if outputs else np.zeros((0, target.width))
    return {target.HEADLINE: target.headline(scores, data.labels) if len(data) else 0.0,
            "loss": loss / max(len(data), 1), "scores": scores}


def accuracy(model: torch.nn.Module, data: FeatureSet, modalities: list[str], device: torch.device,
             batch_size: int = 512) -> float:
    """The headline metric (accuracy for a category target) of ``model`` on ``data``."""
    return score(model, data, modalities, device, batch_size)[data.target.HEADLINE]


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint saves and a resumed run starts from. ``metric``: the row key
    that early stopping and the checkpoint choice follow (``val_<the target's headline>``)."""
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"score": -math.inf, "epoch": -1, "state": None})
    history: list = field(default_factory=list)
    stalled: int = 0  # epochs since the best validation score (early stopping)
    finished: dict | None = None  # metrics of a model an interrupted run already finished
    metric: str = "val_accuracy"

    def record(self, row: dict, model: torch.nn.Module) -> None:
        self.history.append(row)
        if row[self.metric] > self.best["score"]:
            self.best = {"score": row[self.metric], "epoch": row["epoch"],
                         # contiguous: channels-last conv weights (CUDA) are not, and safetensors needs it
                         "state": {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}}
            self.stalled = 0
        else:
            self.stalled += 1


@dataclass
class Optimisation:
    """Optimiser, warmup + cosine schedule, loss and mixed precision of one run."""
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    amp_dtype: torch.dtype

    @classmethod
    def create(cls, params, model: torch.nn.Module, steps_per_epoch: int, device: torch.device,
               target: Target) -> "Optimisation":
        total_steps, warmup = steps_per_epoch * params.epochs, int(steps_per_epoch * params.warmup_epochs)
        # fused: one kernel for the whole update on CUDA (the step is launch-bound at this model size)
        optimizer = torch.optim.AdamW(param_groups(model, params.lr), lr=params.lr, weight_decay=params.weight_decay,
                                      fused=device.type == "cuda")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
        amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and amp_dtype == torch.float16)
        return cls(optimizer, schedule, scaler, target.loss(params).to(device), amp_dtype)


def train(params, model_params, features_root: Path, modalities: list[str], out_dir: Path | None,
          checkpoint_dir: Path | None, on_epoch: Callable[[int, dict], None] | None = None,
          init_model: torch.nn.Module | None = None,
          on_resume: Callable[[list[dict]], None] | None = None, aligned: Path | None = None,
          teacher: Teacher | None = None) -> dict[str, Any]:
    """Train one model on ``modalities``; write weights + config to ``out_dir`` (rank 0); return metrics.

    ``aligned``: the pretrain stage's folder, whose aligned encoders a fresh model starts from (``model.init``).
    ``init_model`` fine-tunes that model instead of a fresh one (the compress stage, after pruning; or a fresh
    student there); it is then returned with its best weights as ``result["model"]``. ``teacher``: the student
    learns that model's outputs as well as the labels (``mmpipe.training.distill``; one process, no DDP). ``checkpoint_dir`` None: no resume.
    ``on_epoch(epoch, row)`` follows each epoch trained now; ``on_resume(rows)`` receives the epochs a
    killed run had trained when this one resumes from its checkpoint.

    With ``checkpoint_dir``, every epoch saves everything needed to continue exactly (weights,
    optimiser, schedule, grad scaler, every RNG, history, best weights, early-stopping counter), and a
    finished model stays there as a *finished* checkpoint (``result["checkpoint"]``) until the caller
    has written its outputs and calls ``clear_checkpoints``: a stage killed while training a later
    model then reuses this one instead of training it again.
    """
    started = time.perf_counter()
    world = distributed.world()
    device = prepare_device(params, world)

    # data: every modality is loaded (so the availability mask is complete); the model uses its own.
    # A frozen backbone's output cached by preprocess (preprocess.<m>.embed) replaces its raw arrays.
    train_set = FeatureSet(features_root, split="train", embeddings=True)
    val_set = FeatureSet(features_root, split="val", embeddings=True)
    if params.label_fraction < 1.0:  # fewer labels (the label-efficiency benchmark; pretrain still sees every row)
        train_set.select(labelled_share(train_set, params.label_fraction, params.seed))
    placement = place_splits({"train": train_set, "val": val_set}, device, params.memory_budget_mb * 2**20)

    target = train_set.target  # what the model predicts: its head, loss and headline metric
    metric = f"val_{target.HEADLINE}"
    # what the best epoch and early stopping follow: distilling, the headline over every modality subset
    selection = metric if teacher is None else f"{metric}_every_subset"
    config = model_config(modalities, train_set.state, model_params.model_dump(), target)
    model, pretrained, aligned_from = init_model, {}, None
    if model is None:  # a fresh model: local weight files into the backbones that have them
        model = build_model(config)
        pretrained = load_pretrained(model)
        if aligned is not None:  # the pretrain stage's aligned encoders replace the fresh ones
            aligned_from = load_aligned_encoders(model, aligned, modalities)
            if world.is_main:
                print(f"train[{'+'.join(modalities)}]: encoders from the aligned ones in {aligned} "
                      f"({aligned_from['loss']} pretraining)")
        if world.is_main:
            for m, info in pretrained.items():
                print(f"train[{'+'.join(modalities)}]: {m} encoder {info['arch']}: "
                      + (info.get("note") or f"weights {info['weights']}")
                      + f", {info['frozen_blocks']} of {info['blocks']} blocks frozen")
                for warning in info.get("warnings", []):
                    print(f"train[{'+'.join(modalities)}]: warning: {warning}")
    for m in check_cached_embeddings(model, train_set, modalities, pretrained):
        if m in pretrained:
            pretrained[m]["cached_embeddings"] = True
        if world.is_main:
            print(f"train[{'+'.join(modalities)}]: {m} from the embeddings preprocess cached (no input augmentation)")
    graphs = use_cuda_graphs(params.cuda_graphs, device, world, params.compile, teacher is not None)
    model, step_model = place_model(model, device, world, params.compile, graphs, strict=params.cuda_graphs is True)
    # batch_size is the global batch: each of N processes takes 1/N of it, so the optimiser sees the same
    # steps (and the same lr schedule fits) however many processes torchrun starts
    rank_batch = math.ceil(params.batch_size / world.size)
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world.size) / rank_batch)
    opt = Optimisation.create(params, model, steps_per_epoch, device, target)
    if teacher is not None:  # its vectors of every train row, once (eval mode: the same each epoch)
        teacher.to(device).remember(train_set, modalities, device)

    name = "+".join(modalities)
    checkpoint = checkpoint_path(checkpoint_dir, name, config, params, features_root,
                                 {m: info.get("sha256") for m, info in pretrained.items()}
                                 | ({"aligned": aligned_from["sha256"]} if aligned_from else {}))
    progress = resume(checkpoint, model, opt, device, params.epochs, name if world.is_main else None, selection)
    if on_resume and world.is_main and progress.history:  # the epochs the killed run trained (its curves)
        on_resume(progress.history)
    seen = 0  # samples this process trained on (throughput)
    for epoch in range(progress.start_epoch, params.epochs):
        if progress.stalled >= params.patience:  # early stopping, checked first: a resumed run stops where the original did
            break
        tic = time.perf_counter()
        loss_sum, sums, n = train_epoch(step_model, model, train_set, opt, params, epoch, world, device, modalities,
                                        rank_batch, steps_per_epoch, teacher)
        seen += n
        val = score(model, val_set, modalities, device) if world.is_main else {target.HEADLINE: 0.0, "loss": 0.0}
        val_score = distributed.from_main(val[target.HEADLINE], device)
        row = {"epoch": epoch, "train_loss": loss_sum / n, f"train_{target.HEADLINE}": target.from_running(sums, n),
               metric: val_score, "val_loss": val["loss"], "lr": opt.schedule.get_last_lr()[0],
               "samples_per_s": n / (time.perf_counter() - tic)}
        if teacher is not None:
            row[selection] = distributed.from_main(
                teacher.selection_score(model, val_set, device) if world.is_main else 0.0, device)
        progress.record(row, model)
        if on_epoch and world.is_main:
            on_epoch(epoch, row)
        if world.is_main and checkpoint is not None:
            _save(checkpoint, {"model": model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                               "schedule": opt.schedule.state_dict(), "scaler": opt.scaler.state_dict(),
                               "rng": rng_state(device), "epoch": epoch, "best": progress.best,
                               "history": progress.history, "stalled": progress.stalled})

    # the best epoch's weights; what the target tunes on the validation split with them (set: thresholds)
    tuned, val_scores = {}, None
    if world.is_main and target.TUNES_ON_VAL and progress.finished is None and progress.best["state"] is not None:
        model.load_state_dict(progress.best["state"])
        val_scores = score(model, val_set, modalities, device)["scores"]
        tuned = target.fit_on_val(val_scores, val_set.labels)
        config["target"]["state"].update(tuned)
    elif progress.finished is not None:
        tuned = progress.finished.get("tuned_on_val", {})
        config["target"]["state"].update(tuned)
    # outputs: the best epoch's weights, the run's metrics, and the finished checkpoint until the caller is done
    if world.is_main and out_dir is not None:
        save_model(out_dir, progress.best["state"], config)
    metrics = progress.finished
    if metrics is None:
        seconds = time.perf_counter() - started
        metrics = {"modalities": modalities, "headline": target.HEADLINE, "best_epoch": progress.best["epoch"],
                   metric: best_row(progress).get(metric, progress.best["score"]), "epochs_run": len(progress.history),
                   "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1),
                   "samples_per_s": round(seen / seconds, 1), "device": device.type, "processes": world.size,
                   "data": placement}
        if selection != metric:
            metrics[selection] = progress.best["score"]
        if pretrained:
            metrics["pretrained"] = pretrained
        if aligned_from:
            metrics["init"] = {"aligned": aligned_from}
        if params.label_fraction < 1.0:
            metrics["labelled_rows"] = len(train_set)
        if tuned:  # (set: per-tag thresholds) kept in the model's config; the headline above is at 0.5
            metrics["tuned_on_val"] = tuned
            metrics[f"{metric}_tuned"] = target.fitted({**target.state, **tuned}).headline(val_scores, val_set.labels)
        if device.type == "cuda":
            metrics["cuda_graphs"] = isinstance(step_model, GraphedSteps) and step_model.step is not step_model.model
            metrics["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if world.is_main and checkpoint is not None:  # small (the best weights): cleared by clear_checkpoints
            _save(checkpoint, {"finished": True, "best": progress.best, "history": progress.history,
                               "metrics": metrics})
    result = {"metrics": metrics, "history": progress.history, "checkpoint": checkpoint}
    if init_model is not None:
        model.load_state_dict(progress.best["state"])
        result["model"] = model.cpu().eval()
    return result


def best_row(progress: Progress) -> dict:
    """The history row of the best epoch (the epoch ``progress.best`` kept), or {} before any."""
    return next((row for row in progress.history if row["epoch"] == progress.best["epoch"]), {})


def labelled_share(data: FeatureSet, fraction: float, seed: int) -> np.ndarray:
    """The positions of a seeded ``fraction`` of ``data``'s labelled rows: for a category target, that share of
    each class (at least one row each), else of all rows."""
    rng = np.random.default_rng(seed)
    labels = data.labels
    if labels.ndim == 1 and labels.dtype.kind in "iu":  # classes
        picked = [rng.permutation(np.flatnonzero(labels == c))[:max(1, round(fraction * np.sum(labels == c)))]
                  for c in np.unique(labels)]
        return np.sort(np.concatenate(picked))
    return np.sort(rng.permutation(len(labels))[:max(1, round(fraction * len(labels)))])


def check_cached_embeddings(model: torch.nn.Module, data: FeatureSet, modalities: list[str],
                            pretrained: dict[str, dict] | None = None, samples: int = 8) -> list[str]:
    """The ``modalities`` ``data`` serves as cached embeddings, each checked to be the output of this
    model's (frozen) backbone: computed from the very weights file train loaded (``pretrained``: what
    ``load_pretrained`` said, sha256 included), and its raw arrays of a few train samples going through
    the backbone must give the cached vectors (within float16/bf16 rounding). Else one line: a stale
    cache would train heads on features the shipped model never computes."""
    checked = []
    for m in modalities:
        if m not in data.embedded:
            continue
        encoder = model.encoders[m]
        where = f"{data.root / m}: the cached embeddings (preprocess.{m}.embed)"
        cached_from, loaded = data.state[m]["embedding"].get("sha256"), (pretrained or {}).get(m, {}).get("sha256")
        if cached_from and loaded and cached_from != loaded:
            raise PipelineError(f"{where} were computed with weights of sha256 {cached_from[:12]}, but "
                                f"{(pretrained or {})[m].get('weights')} now has {loaded[:12]}: re-run preprocess@{m}")
        if not hasattr(encoder, "embed") or any(p.requires_grad for p in encoder.backbone.parameters()):
            raise PipelineError(f"{where} need model.encoders.{m} to be the frozen backbone that computed them "
                                f"(a pretrained arch, freeze: all): re-run preprocess@{m}, or set embed: false")
        positions = np.flatnonzero(data.available[:, data.modalities.index(m)])[:samples]
        batch = data.get(positions, raw=True)
        was_training = encoder.training
        encoder.eval()
        with torch.no_grad():
            device = next(encoder.parameters()).device
            fresh = encoder.embed(*(batch[name].to(device) for name in model.arrays[m])).float().cpu()
        encoder.train(was_training)
        cached = batch[embedding_key(m)].float()
        errors = (fresh - cached).norm(dim=1) / fresh.norm(dim=1).clamp(min=1e-6)
        if len(positions) and errors.max().item() > 0.05:
            worst = int(errors.argmax())
            raise PipelineError(f"{where} are not this model's backbone output (relative difference "
                                f"{errors[worst].item():.2f} on sample {data.sample_ids[positions[worst]]}): "
                                f"re-run preprocess@{m}")
        checked.append(m)
    return checked


def place_splits(splits: dict[str, FeatureSet], device: torch.device, budget_bytes: int) -> dict[str, str]:
    """Each split held on ``device`` while the memory budget lasts (no copies per batch), else streamed
    from its shards batch by batch: {split: "in_memory" | "streamed"}. Same batches either way."""
    placement = {}
    for name, data in splits.items():
        placement[name] = data.place(device, budget_bytes)
        if placement[name] == "in_memory":
            budget_bytes -= data.nbytes
    return placement


def prepare_device(params, world) -> torch.device:
    """The device of this process (its own GPU under torchrun), thread count and seeds."""
    device = torch.device(resolve_device(params.device, "train.device"))
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    if params.threads:
        torch.set_num_threads(params.threads)
    seed_everything(params.seed, device)
    return device


def place_model(model: torch.nn.Module, device: torch.device, world, compile_model: bool, graphs: bool = False,
                strict: bool = False):
    """(the model, the module the steps call): on ``device``, wrapped in DDP under torchrun, compiled on request,
    or replaying CUDA graphs (``graphs``: ``use_cuda_graphs``; ``strict``: no eager fallback)."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    step_model = model
    if world.size > 1:  # gradients averaged over the ranks
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if graphs:
        return model, GraphedSteps(step_model, torch.compile(step_model, mode="reduce-overhead"), strict)
    return model, (torch.compile(step_model) if compile_model else step_model)


def use_cuda_graphs(setting: str | bool, device: torch.device, world, compile_model: bool, distilling: bool) -> bool:
    """Whether training steps replay CUDA graphs (``train.cuda_graphs``). ``auto``: on one CUDA process, unless
    train.compile (its own choice) or a teacher (distillation's step is not the model's call) says otherwise;
    ``true`` off CUDA is one line."""
    if setting is True and device.type != "cuda":
        raise PipelineError(f"train.cuda_graphs: true needs a CUDA device (train.device resolved to {device.type}): "
                            f"set it to auto or false")
    if setting == "auto":
        return device.type == "cuda" and world.size == 1 and not compile_model and not distilling
    return bool(setting)


class GraphedSteps:
    """The training steps' module as CUDA graphs: ``compiled`` (torch.compile mode reduce-overhead, which records
    a graph per batch shape and replays it) in place of ``model``. Each step marks a new graph step (the last
    step's outputs may be overwritten). ``strict`` False (``cuda_graphs: auto``): if the first compiled call
    fails, say so in one line and step eagerly from then on: a GPU image without a working compiler still trains."""

    def __init__(self, model: torch.nn.Module, compiled: Callable, strict: bool = False):
        self.model, self.step, self.strict, self.checked = model, compiled, strict, False

    def train(self, mode: bool = True) -> "GraphedSteps":
        self.model.train(mode)
        return self

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if torch.cuda.is_available():
            torch.compiler.cudagraph_mark_step_begin()
        if self.checked or self.strict:
            return self.step(inputs)
        try:
            out = self.step(inputs)
        except Exception as error:  # noqa: BLE001 - any compiler failure: fall back, said in one line
            print(f"train: CUDA graphs unavailable ({type(error).__name__}: {str(error).splitlines()[0][:200]}): "
                  f"training eagerly (train.cuda_graphs: false silences this)")
            self.step = self.model
            out = self.step(inputs)
        self.checked = True
        return out


PACKAGE = Path(__file__).resolve().parents[1]
MODEL_CODE = [PACKAGE / "training", PACKAGE / "models", PACKAGE / "modalities", PACKAGE / "targets"]


def code_digest() -> str:
    """The model code: every module of mmpipe/training, mmpipe/models, mmpipe/modalities and mmpipe/targets
    (the training loop, the networks, the encoders' factories, the heads' losses), byte for byte."""
    digest = hashlib.sha1()
    for path in sorted(p for folder in MODEL_CODE for p in folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def checkpoint_path(checkpoint_dir: Path | None, name: str, config: dict, params, features_root: Path,
                    weights: dict[str, str | None] | None = None) -> Path | None:
    """The checkpoint of this very run (same model config, train params, data, model code and
    pretrained weights files' content: ``weights``, sha256 by modality), or None (no resume). A run
    killed before a code or weights change does not resume into the changed model."""
    if checkpoint_dir is None:
        return None
    run_key = hashlib.sha1(json.dumps([config, params.model_dump(), features_digest(features_root), code_digest(),
                                       weights or {}], sort_keys=True).encode()).hexdigest()[:16]
    return checkpoint_dir / f"{name}-{run_key}.pt"


def resume(checkpoint: Path | None, model: torch.nn.Module, opt: Optimisation, device: torch.device, epochs: int,
           name: str | None, metric: str = "val_accuracy") -> Progress:
    """Progress restored from ``checkpoint`` (weights, optimiser, RNGs in place), or a fresh start.
    ``name``: the model's name for the message (None: not the main process, say nothing); ``metric``: the
    validation figure that picks the best epoch."""
    if checkpoint is None or not checkpoint.exists():
        return Progress(metric=metric)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # safe loading: tensors and plain data only
    if saved.get("finished"):
        if name:
            print(f"train[{name}]: already trained by an interrupted run of this stage ({checkpoint}): not retrained")
        return Progress(start_epoch=epochs, best=saved["best"], history=saved["history"], finished=saved["metrics"],
                        metric=metric)
    model.load_state_dict(saved["model"])
    opt.optimizer.load_state_dict(saved["optimizer"])
    opt.schedule.load_state_dict(saved["schedule"])
    opt.scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"], device)
    if name:
        print(f"train[{name}]: resuming after epoch {saved['epoch']} from {checkpoint}")
    return Progress(start_epoch=saved["epoch"] + 1, best=saved["best"], history=saved["history"],
                    stalled=saved["stalled"], metric=metric)


def train_epoch(step_model, model: torch.nn.Module, train_set: FeatureSet, opt: Optimisation, params, epoch: int,
                world, device: torch.device, modalities: list[str], rank_batch: int,
                steps_per_epoch: int, teacher: Teacher | None = None) -> tuple[float, list[float], int]:
    """One pass over this process's shard of the train split. Returns (loss sum, the target's running sums of
    its headline, samples) over all ranks. With a ``teacher``, the loss is its distillation step's."""
    step_model.train()
    # sums stay on the device: reading them every step (.item()) would wait for the GPU each time
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    target = train_set.target
    sums = None
    n, tic = 0, time.perf_counter()
    if world.size > 1:  # each rank draws its own augmentation and modality dropout; per epoch, so resume is exact
        torch.manual_seed((params.seed * 100_003 + epoch) * world.size + world.rank)
    batches = train_set.batches(rank_batch, shuffle=True, seed=params.seed * 100_003 + epoch,
                                shard=(world.rank, world.size))
    bar = tqdm(batches, total=steps_per_epoch, desc=f"{'+'.join(modalities)} epoch {epoch}",
               disable=None if world.is_main else True, leave=False)
    for step, batch in enumerate(bar):
        inputs = to_model_inputs(batch, modalities, device)
        inputs["available"] = drop_modalities(inputs["available"], params.modality_dropout)
        with torch.autocast(device.type, dtype=opt.amp_dtype, enabled=device.type == "cuda"):
            if teacher is None:
                logits = step_model(inputs)
                loss = opt.loss_fn(logits.float(), inputs["label"])
            else:
                logits, loss = teacher.step(model, inputs, opt.loss_fn, target)
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.schedule.step()
        batch_n = len(inputs["label"])
        loss_sum += loss.detach().double() * batch_n
        batch_sums = target.running(logits.detach().float(), inputs["label"])
        sums = batch_sums if sums is None else sums + batch_sums
        n += batch_n
        if step % 25 == 24 and not bar.disable:  # the progress bar's figures: one sync every 25 steps
            bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}",
                            **{target.HEADLINE: f"{target.from_running(sums.tolist(), n):.3f}"},
                            samples_s=f"{n / (time.perf_counter() - tic):.0f}")
    sums = sums.tolist() if sums is not None else [0.0] * target.RUNNING_SIZE
    loss_sum, *sums, n = distributed.all_sum([loss_sum.item(), *sums, n], device)
    return loss_sum, sums, n


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a kill leaves the previous checkpoint, never half of one
