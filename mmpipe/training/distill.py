"""Knowledge distillation: a smaller student of the trained fusion model, taught the teacher's outputs under
every modality-availability pattern (compress.distill).

``student_config`` scales the teacher's widths down; ``Teacher.step`` is the training step's loss when a
teacher is given to ``train()``: the labels' loss blended with a distillation loss (the target's
``distill_loss``: soft classes, soft tags, or the teacher's number) computed under several masks per batch —
the batch's modality dropout, a random non-empty subset of each row's modalities, and each modality alone —,
teacher and student seeing the same mask each time, plus (``feature_weight``) a feature loss pulling each of the
student's encoder vectors toward the teacher's (a pruned student's vectors have the teacher's size; a fresh
student's may not, and then it is skipped) and (``map_weight``) attention transfer on the encoders' activation
maps. The encoders run once per batch; only the fusion and head run per mask (``FusionModel.fuse``), so the
extra masks cost little. That is what lets the student keep the teacher's behaviour when modalities are
missing, not only its all-modality accuracy. With ``augmented`` the teacher's encoders run every step on the
student's own augmented inputs (``Teacher.encode_as_student``); without, once per train row before the first
epoch on the clean ones (``Teacher.remember``), each step looking its rows up.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mmpipe.errors import PipelineError
from mmpipe.training.model_io import subset_outputs, to_model_inputs

# small_cnn encoder keys whose value is a channel/width count (scaled for the student); other archs are not
SCALED_KEYS = ("width", "embed_dim")


def student_config(teacher_config: dict[str, Any], scale: float,
                   encoder_scales: dict[str, float] | None = None) -> dict[str, Any]:
    """The teacher's model config with ``model.dim``, ``model.hidden`` and each small_cnn encoder's widths
    multiplied by ``scale`` (as ``channels``; dim a multiple of the attention heads), or by the encoder's own
    entry of ``encoder_scales`` (by modality). A pretrained backbone (a torchvision/huggingface/torchaudio arch)
    has no width to scale and its preprocessed inputs fit only it: distilling such a teacher is refused with
    one line."""
    config = copy.deepcopy(teacher_config)
    model = config["model"]
    for m, encoder in model.get("encoders", {}).items():
        if m not in config["modalities"]:
            continue
        if encoder.get("arch", "small_cnn") != "small_cnn":
            raise PipelineError(f"compress.distill: model.encoders.{m}.arch is {encoder['arch']}: the student scales "
                                f"small_cnn encoders only (set compress.distill.enabled: false for pretrained backbones)")
        own = (encoder_scales or {}).get(m, scale)
        for key in SCALED_KEYS:
            if isinstance(encoder.get(key), (int, float)) and not isinstance(encoder[key], bool):
                encoder[key] = channels(encoder[key] * own) if own < 1.0 else encoder[key]
    heads = model.get("attention_heads", 1)  # (model params require dim to be a multiple, whatever the fusion)
    model["dim"] = max(heads, round(channels(model["dim"] * scale) / heads) * heads)
    model["hidden"] = channels(model["hidden"] * scale)
    return config


def channels(width: float) -> int:
    """A scaled width as a channel count: a multiple of 8 from 8 up (ONNX Runtime's AVX2 kernels work in blocks
    of 8 channels: 12 channels cost about what 16 do; docs/architecture.md "Compression"); below 6, at least 4."""
    return max(8, round(width / 8) * 8) if width >= 6 else max(4, round(width))


def random_patterns(available: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per row, a random non-empty subset of its available modalities (each kept with probability 1/2; a row
    left with none keeps one of its own at random). Rows with nothing available stay empty."""
    keep = torch.rand(available.shape, device=available.device, generator=generator) < 0.5
    pattern = available & keep
    empty = ~pattern.any(dim=1) & available.any(dim=1)
    if empty.any():
        noise = torch.rand(available.shape, device=available.device, generator=generator).masked_fill(~available, -1.0)
        one = torch.zeros_like(available).scatter_(1, noise.argmax(dim=1, keepdim=True), True)
        pattern = torch.where(empty[:, None], one, pattern)
    return pattern


@dataclass
class Teacher:
    """The trained model a student learns from, in eval mode, and how: ``alpha`` weighs the distillation loss
    against the labels' (1 - alpha), ``temperature`` softens the teacher's outputs."""
    model: nn.Module
    temperature: float = 2.0
    alpha: float = 0.7
    feature_weight: float = 0.0  # weight of the encoders' vectors matched to the teacher's (``step``)
    augmented: bool = False  # the teacher encodes the student's augmented inputs each step (``encode_as_student``)
    map_weight: float = 0.0  # weight of the encoders' intermediate activation maps matched (``map_loss``)
    alone_weight: float = 1.0  # weight of the each-modality-alone view in the distillation loss (``step``)
    select_by: str = "mean"  # the student's epoch kept: "mean" | "mean_and_worst_gap" (``selection_score``)
    encoded: torch.Tensor | None = None  # the teacher's vectors of every train row (``remember``)
    reference: dict | None = None  # the teacher's validation headline per modality subset (``selection_score``)

    def __post_init__(self) -> None:
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def to(self, device: torch.device) -> "Teacher":
        self.model.to(device)
        return self

    @torch.no_grad()
    def remember(self, data, modalities: list[str], device: torch.device, batch_size: int = 512) -> None:
        """Encode every row of ``data`` (the train split ``train()`` batches, positions = the batches' ``index``)
        once: (rows, modalities, dim) on ``device``, 4 bytes a value. Without it each step encodes its batch.
        Not when the teacher sees the augmented inputs: those differ every step."""
        if self.augmented:
            return
        encoded = None
        for batch in data.batches(batch_size):
            inputs = to_model_inputs(batch, modalities, device)
            vectors = self.model.encode(inputs).float()
            if encoded is None:
                encoded = torch.empty((len(data), *vectors.shape[1:]), device=device)
            encoded[inputs["index"].to(device)] = vectors
        self.encoded = encoded

    @torch.no_grad()
    def encode_as_student(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """The teacher's vectors of the very inputs the student's next ``encode`` will see, augmentation
        included, and its encoders' activation maps when ``map_weight`` asks for them (else {}): each encoder's
        augmentation switched on (its own ``training`` flag only: batch-norm and the rest stay in eval mode) and
        the random generator put back afterwards, so the student's encoders draw the same jitter, masks and
        token dropout. Encoders draw by input shape, not width, so a narrower student draws alike."""
        devices = [inputs["available"].device] if inputs["available"].is_cuda else []
        encoders = list(self.model.encoders.values())
        with torch.random.fork_rng(devices=devices), activation_maps(self.model, bool(self.map_weight)) as maps:
            for encoder in encoders:
                encoder.training = True
            try:
                return self.model.encode(inputs).float(), maps
            finally:
                for encoder in encoders:
                    encoder.training = False

    @torch.no_grad()
    def selection_score(self, student: nn.Module, data, device: torch.device) -> float:
        """What ``train()`` keeps the best epoch and stops early by when it distils: the student's validation
        headline averaged over every non-empty subset of its modalities (each row with only those of the subset
        it has) and, with ``select_by: mean_and_worst_gap``, plus the worst subset's gap to the teacher's own
        (negative when the student is behind), so that an epoch strong on average but a point down on one
        modality loses to one level with the teacher everywhere. The all-modality score alone would not do: two
        runs that stopped at different epochs by it differed by 0.3 points with all modalities and by 3.5 points
        on image alone (docs/benchmarks.md)."""
        student_scores = subset_scores(student, data, device)
        score = float(np.mean(list(student_scores.values())))
        if self.select_by == "mean_and_worst_gap":
            if self.reference is None:  # the teacher's, once: it does not change
                self.reference = subset_scores(self.model, data, device)
            score += min(student_scores[s] - self.reference[s] for s in student_scores)
        return score

    def step(self, student: nn.Module, inputs: dict[str, torch.Tensor], label_loss: nn.Module,
             target) -> tuple[torch.Tensor, torch.Tensor]:
        """(the student's outputs under the batch's mask, the step's loss). The distillation loss is the mean of
        three views, teacher and student under the same mask in each: the batch's modality dropout, a random
        non-empty subset of each row's modalities, and each modality alone (the mean over modalities, each over
        the rows that have it). The third is there because single modalities are where a smaller student loses
        most: under random subsets each one is alone in only ~8 % of the rows, and taught only so, a student
        pruned to 18 % of the MACs kept the teacher's all-modality accuracy but lost 3.5 points on audio alone
        (docs/benchmarks.md "Distillation"). ``alone_weight`` weighs the third view against the other two's 1."""
        available = inputs["available"].bool()
        alone = [available & (torch.arange(available.shape[1], device=available.device) == i)
                 for i in range(available.shape[1])]
        masks = [available, random_patterns(available), *alone]
        teacher_maps: dict = {}
        with torch.no_grad():
            if self.augmented:
                taught, teacher_maps = self.encode_as_student(inputs)
            else:
                taught = self.encoded[inputs["index"]] if self.encoded is not None else self.model.encode(inputs)
            teacher_out = [self.model.fuse(taught, mask).float() for mask in masks]
        with activation_maps(student, bool(teacher_maps)) as maps:
            encoded = student.encode(inputs)  # once: only the fusion and the head run per mask
        outputs = [student.fuse(encoded, mask).float() for mask in masks]
        loss = lambda s, t: target.distill_loss(s, t, self.temperature)  # noqa: E731
        single = [loss(s[rows], t[rows]) for rows, s, t in zip(available.unbind(1), outputs[2:], teacher_out[2:])
                  if rows.any()]
        views = [(1.0, loss(outputs[0], teacher_out[0])), (1.0, loss(outputs[1], teacher_out[1]))] + \
            ([(self.alone_weight, sum(single) / len(single))] if single else [])  # (weight, loss)
        distill = sum(w * v for w, v in views) / sum(w for w, _ in views)
        total = (1 - self.alpha) * label_loss(outputs[0], inputs["label"]) + self.alpha * distill
        if self.feature_weight and encoded.shape == taught.shape and available.any():
            total = total + self.feature_weight * feature_loss(encoded, taught, available)
        if maps:
            total = total + self.map_weight * map_loss(maps, teacher_maps, available, student.modalities)
        return outputs[0], total


def subset_scores(model: nn.Module, data, device: torch.device) -> dict[tuple[str, ...], float]:
    """{non-empty modality subset: the model's headline metric on ``data`` with only that subset available}."""
    outputs = subset_outputs(model, data.get(np.arange(len(data))), device)
    target = data.target
    return {subset: target.headline(target.scores(torch.from_numpy(out)).numpy(), data.labels)
            for subset, out in outputs.items() if subset}


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """How far each of the student's modality vectors (B, modalities, dim) is from the teacher's: squared
    distance relative to the teacher vector's mean square, averaged over the (row, modality) pairs available.
    What lets each encoder carry a modality alone as the teacher's does: the logits' loss only sees the
    encoders through the fused head, and single-modality retention is where a pruned student lost most."""
    gap = (student.float() - teacher).pow(2).mean(-1) / teacher.pow(2).mean(-1).clamp_min(1e-8)
    return gap[available].mean()


@contextmanager
def activation_maps(model: nn.Module, enabled: bool = True):
    """Within the block, {modality: [the output of each ReLU module of its encoder, in call order]} of what the
    model computes ({} when not ``enabled``). A pruned student has the teacher's layers with fewer channels, so
    its list pairs with the teacher's one to one."""
    maps: dict[str, list[torch.Tensor]] = {}
    handles = []
    for m, encoder in getattr(model, "encoders", {}).items() if enabled else ():
        for module in encoder.modules():
            if isinstance(module, nn.ReLU):
                handles.append(module.register_forward_hook(
                    lambda _module, _inputs, out, m=m: maps.setdefault(m, []).append(out)))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def map_loss(student: dict, teacher: dict, available: torch.Tensor, modalities: list[str]) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) over ``activation_maps``: each map's spatial
    attention (the channel mean of squares, L2-normalised per row), the student's vs the teacher's, squared
    distance summed over positions, averaged over the maps and the rows that have the modality. Needs no
    projection: the attention has no channel axis, and a pruned student keeps the teacher's spatial sizes
    (maps without spatial axes, or of another size, are skipped). What the feature loss on the output vector
    alone did not give: how the audio encoder attends over time and frequency on the way there."""
    losses = []
    for i, m in enumerate(modalities):
        rows = available[:, i]
        if m not in student or not rows.any():
            continue
        for s, t in zip(student[m], teacher[m]):
            if s.dim() < 3 or s.shape[2:] != t.shape[2:]:
                continue
            a_s = nn.functional.normalize(s[rows].float().pow(2).mean(1).flatten(1), dim=1)
            a_t = nn.functional.normalize(t[rows].float().pow(2).mean(1).flatten(1), dim=1)
            losses.append((a_s - a_t).pow(2).sum(1).mean())
    return sum(losses) / len(losses) if losses else available.new_zeros((), dtype=torch.float32)
