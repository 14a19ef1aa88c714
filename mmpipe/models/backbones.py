"""Pretrained backbones by architecture name, with weights from a local file — never a download.

An encoder built here takes its architecture from a library's model builders — torchvision's
classifiers by name (``torchvision.models.get_model``), torchaudio's self-supervised speech encoders
(wav2vec 2.0, HuBERT, WavLM) by builder name, or a Hugging Face text encoder from its ``config.json``
—, drops the task head and maps the backbone's features to the fused ``dim`` with its own
projection. The architecture alone is built from the config, so a trained model reloads from its own
``model.safetensors`` without the weights file or folder; :meth:`Backbone.load_pretrained` copies the
weights in when training starts.

``freeze``: ``none``, ``all``, or the number of leading *blocks*: the backbone's parameterised
children in order, with plain ``Sequential``/``ModuleList`` containers (ResNet's ``layer1``-``layer4``,
the ``features`` of MobileNet/EfficientNet/ConvNeXt, ViT's ``encoder.layers``, wav2vec 2.0's
convolutions and transformer layers) opened into their blocks, and so is a module outside any
container that holds one; parameters a container owns directly (ViT's class token and position
embedding) count as blocks. Frozen blocks keep ``requires_grad=False`` and stay in eval mode while
training (their BatchNorm statistics do not drift). ``lr_scale`` multiplies the learning rate of the
backbone's trainable parameters. ``checkpointing`` recomputes each trainable block's activations
during the backward pass instead of keeping them (``torch.utils.checkpoint``): memory for compute,
for big backbones on a GPU; blocks holding BatchNorm are left as they are (the recomputation would
update their running statistics twice)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn

from mmpipe.errors import PipelineError
from mmpipe.extras import require
from mmpipe.models.encoders import affine_jitter


def weights_recipe(arch: str) -> str:
    """How to get ``arch``'s pretrained weights into a local file, on a machine that can download."""
    return (f"python -c \"import torch, torchvision; torch.save(torchvision.models.get_model_weights('{arch}')"
            f".DEFAULT.get_state_dict(), '{arch}.pth')\"")


def read_state_dict(path: Path, field: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (torch.save's .pt/.pth, read with weights_only, or .safetensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:  # noqa: BLE001 - a user's file: one line, whatever the loader says
        raise PipelineError(f"{field}: {path} is not a state dict that torch can read safely "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            f"save the model's state_dict() with torch.save or safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a training checkpoint that wraps it
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{field}: {path} holds no state dict (a mapping of names to tensors)")
    return state


def _is_container(module: nn.Module) -> bool:
    return type(module) in (nn.Sequential, nn.ModuleList)  # plain ones; not subclasses (Conv2dNormActivation)


def _holds_blocks(module: nn.Module) -> bool:
    """True when a plain container of several parameterised modules sits somewhere below ``module``."""
    return any(_is_container(m) and sum(1 for c in m.children() if any(True for _ in c.parameters())) > 1
               for m in module.modules() if m is not module)


def leading_blocks(module: nn.Module, prefix: str = "",
                   in_container: bool = False) -> list[tuple[str, nn.Module | nn.Parameter]]:
    """The backbone's blocks in order (see the module docstring): (dotted name, module or parameter)."""
    out: list[tuple[str, nn.Module | nn.Parameter]] = []
    for name, param in module.named_parameters(recurse=False):  # ViT's class token, position embedding
        out.append((prefix + name, param))
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue  # ReLU, pooling, dropout, the removed head
        # plain containers open; so does a module outside any container that holds one (ViT's encoder,
        # wav2vec2's feature extractor and transformer, BERT's encoder); a container's members are blocks
        if _is_container(child) or (not in_container and _holds_blocks(child)):
            out += leading_blocks(child, f"{prefix}{name}.", in_container=_is_container(child))
        else:
            out.append((prefix + name, child))
    return out


def _drop_head(net: nn.Module) -> str:
    """Replace the last ``Linear`` (the classifier) by Identity; return its dotted name."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, nn.Identity())  # Sequential children are registered by name too ("3", "head")
    return name


class _Recomputed:
    """Mixin of a checkpointed block's class: its forward runs under ``torch.utils.checkpoint`` while
    training with gradients (the RNG state is replayed, so dropout draws the same masks)."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


_RECOMPUTED: dict[type, type] = {}


def recompute_in_backward(block: nn.Module) -> bool:
    """Make ``block`` checkpointed by swapping its class for a subclass with :class:`_Recomputed` (the
    state dict, ``deepcopy`` and export are unchanged; a forward wrapper closure would not survive
    compress's deepcopy). False, and left alone, when it holds BatchNorm."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules()):
        return False
    cls = type(block)
    if cls not in _RECOMPUTED:
        _RECOMPUTED[cls] = type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {})
    block.__class__ = _RECOMPUTED[cls]
    return True


class Backbone(nn.Module):
    """What every pretrained encoder shares: ``self.backbone`` (the network without its head), frozen
    leading blocks, the learning-rate scale, and the weights file copied in by :meth:`load_pretrained`.
    A subclass builds ``backbone`` then calls :meth:`setup`; it names the state-dict keys of the head it
    dropped (``head_keys``) and how to get the weights on a connected machine (``recipe``)."""

    modality: str
    arch: str
    weights: str | None
    head_keys: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # said when the weights are loaded (inputs unlike those they were trained on)

    def setup(self, backbone: nn.Module, freeze, lr_scale: float, checkpointing: bool = False) -> None:
        self.backbone = backbone
        self.backbone.lr_scale = lr_scale  # read by the trainer's parameter groups
        blocks = leading_blocks(backbone)
        n = 0 if freeze == "none" else len(blocks) if freeze == "all" else min(int(freeze), len(blocks))
        self.frozen_blocks = [name for name, _ in blocks[:n]]
        self.n_blocks = len(blocks)
        self._frozen_modules = []
        for _, block in blocks[:n]:
            block.requires_grad_(False)
            if isinstance(block, nn.Module):
                self._frozen_modules.append(block)
        if n == len(blocks):  # wholly frozen: its containers too (wav2vec2's layer drop draws in training mode)
            self._frozen_modules = [backbone]
        self.checkpointed_blocks = [name for name, block in blocks[n:] if checkpointing
                                    and isinstance(block, nn.Module) and recompute_in_backward(block)]

    def recipe(self) -> str:
        raise NotImplementedError

    def embed(self, *arrays: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (B, E) of the model's input arrays: what ``project`` maps to ``dim``
        and what preprocess caches (``preprocess.<m>.embed``) when every block is frozen."""
        raise NotImplementedError

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, E) backbone features -> (B, dim)."""
        return self.out(embedding)

    def forward(self, *arrays: torch.Tensor) -> torch.Tensor:
        return self.project(self.embed(*arrays))

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for module in self._frozen_modules:  # frozen BatchNorm keeps its pretrained statistics (and dropout is off)
            module.eval()
        return self

    def load_pretrained(self) -> dict:
        """Copy the weights file in (none: random initialisation, said so); return what was loaded, for the logs."""
        info = {"arch": self.arch, "weights": self.weights, "blocks": self.n_blocks,
                "frozen_blocks": len(self.frozen_blocks), "checkpointed_blocks": len(self.checkpointed_blocks),
                "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad)}
        if self.weights is None:
            info["note"] = f"{self.arch}: random initialisation (model.encoders.{self.modality}.weights is null)"
            return info
        if self.warnings:
            info["warnings"] = list(self.warnings)
        field = f"model.encoders.{self.modality}.weights"
        path = Path(self.weights)
        if not path.exists():
            raise PipelineError(f"{field}: {path} not found — get it on a connected machine with "
                                f"{self.recipe()} and copy it there")
        state = self.read_weights(path, field)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
        state = {k: v for k, v in state.items() if not k.startswith(self.head_keys)}
        try:
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes that differ (another width, a ViT at another image size)
            raise PipelineError(f"{field}: {path} does not fit {self.arch}: "
                                f"{' '.join(str(exc).split())[:300]}") from None
        if missing or unexpected:
            raise PipelineError(f"{field}: {path} does not fit {self.arch} "
                                f"({len(missing)} weights missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
                                f"e.g. {unexpected[:2]})")
        info["sha256"] = files_sha256(path)
        return info

    def read_weights(self, path: Path, field: str) -> dict[str, torch.Tensor]:
        """The state dict in ``path`` (a file; a subclass may read folders)."""
        if not path.is_file():
            raise PipelineError(f"{field}: {path} is not a file")
        return read_state_dict(path, field)


def files_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (their names and sha256s, in name order)."""
    def file_hash(file: Path) -> "hashlib._Hash":
        with open(file, "rb") as fh:
            return hashlib.file_digest(fh, "sha256")

    if not path.is_dir():
        return file_hash(path).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + file_hash(file).digest())
    return digest.hexdigest()


def torchvision_transforms(modality: str, arch: str):
    """The preprocessing of ``arch``'s default torchvision weights (crop size, mean, std, min_size), by
    architecture name; one line when torchvision has no classification model of that name."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise PipelineError(f"model.encoders.{modality}.arch: {arch!r} is not a torchvision classification model "
                            f"(one of small_cnn, {', '.join(sorted(known))})")
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return weights.transforms(), weights.meta.get("min_size", (1, 1))


class TorchvisionEncoder(Backbone):
    """uint8 (B, C, H, W) -> (B, dim) through a torchvision classification backbone.

    Pixels are scaled to 0..1 and normalised with the architecture's weights' mean/std (ImageNet's
    for every torchvision classifier), grey images repeated to three channels; the same random affine
    jitter as the small CNN while training (``augment``).
    """

    def __init__(self, modality: str, arch: str, size: int, dim: int, weights: str | None, freeze,
                 lr_scale: float, augment: bool = True, builder_kwargs: dict | None = None, checkpointing: bool = False):
        """``modality`` names the params in messages (``model.encoders.<modality>``); ``builder_kwargs``
        go to torchvision's builder (a ViT's image size)."""
        super().__init__()
        import torchvision

        transforms, min_size = torchvision_transforms(modality, arch)
        if size < max(min_size):
            raise PipelineError(f"model.encoders.{modality}.arch {arch} needs images of at least {max(min_size)} px: "
                                f"set preprocess.{modality}.size (now {size}; its weights were trained at "
                                f"{transforms.crop_size[0]})")
        self.modality, self.arch, self.weights, self.augment = modality, arch, weights, augment
        trained_at = transforms.crop_size[0]
        if size * 2 <= trained_at:  # accepted (random init, small data), but pretrained features barely transfer
            self.warnings = (f"{arch}'s weights were trained on {trained_at} px images, these are {size} px: "
                             f"set preprocess.{modality}.size: {trained_at} to use what they learned",)
        self.register_buffer("mean", torch.tensor(transforms.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(transforms.std, dtype=torch.float32).view(1, -1, 1, 1))
        net = torchvision.models.get_model(arch, weights=None, **(builder_kwargs or {}))
        self.head_keys = (_drop_head(net) + ".",)
        net.eval()
        try:
            with torch.no_grad():
                features = net(torch.zeros(1, 3, size, size)).flatten(1).shape[1]
        except Exception as exc:  # noqa: BLE001 - a shape the architecture refuses: one line
            raise PipelineError(f"model.encoders.{modality}.arch {arch} does not take {size}x{size} inputs "
                                f"(preprocess.{modality}.size): {str(exc).splitlines()[0][:200]}") from None
        self.out = nn.Linear(features, dim)
        self.setup(net, freeze, lr_scale, checkpointing)

    def recipe(self) -> str:
        return weights_recipe(self.arch)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if self.training and self.augment:
            x = affine_jitter(x)
        return self.backbone(x).flatten(1)


def waveform_archs() -> list[str]:
    """torchaudio's self-supervised speech encoders (wav2vec 2.0, HuBERT, WavLM) by builder name."""
    import torchaudio

    return sorted(n for n in dir(torchaudio.models) if n.startswith(("wav2vec2_", "hubert_", "wavlm_"))
                  and "pretrain" not in n and callable(getattr(torchaudio.models, n)))


class TorchaudioEncoder(Backbone):
    """float (B, samples) 16 kHz waveform -> (B, dim) through a torchaudio wav2vec 2.0 / HuBERT / WavLM
    encoder: the transformer's last hidden states, averaged over time, then a projection.

    ``normalize`` (None: as torchaudio's pretrained bundle of that name does — the large LV-60k/XLS-R
    models were trained on zero-mean unit-variance clips) standardises each clip first. ``options``
    go to the builder (``wav2vec2_model``/``wavlm_model`` take the whole configuration there).
    """

    head_keys = ("aux.",)  # a fine-tuned ASR checkpoint's CTC head

    def __init__(self, modality: str, arch: str, sample_rate: int, n_samples: int, dim: int, weights: str | None,
                 freeze, lr_scale: float, normalize: bool | None = None, options: dict | None = None,
                 checkpointing: bool = False):
        super().__init__()
        import torchaudio

        field = f"model.encoders.{modality}"
        known = waveform_archs()
        if arch not in known:
            raise PipelineError(f"{field}.arch: {arch!r} is not a torchaudio speech encoder "
                                f"(one of small_cnn, {', '.join(known)})")
        bundle = getattr(torchaudio.pipelines, arch.upper(), None)
        expected_rate = int(bundle.sample_rate) if bundle is not None else 16000
        if sample_rate != expected_rate:
            raise PipelineError(f"{field}.arch {arch} takes {expected_rate} Hz waveforms: set clean.{modality}.sample_rate: "
                                f"{expected_rate} (now {sample_rate})")
        self.modality, self.arch, self.weights = modality, arch, weights
        self.normalize = bool(getattr(bundle, "_normalize_waveform", False) if normalize is None else normalize)
        try:
            net = getattr(torchaudio.models, arch)(**{**(options or {}), "aux_num_out": None})
        except TypeError as exc:  # options the builder does not take, or misses
            raise PipelineError(f"{field}.options do not fit torchaudio.models.{arch}: {exc}") from None
        net.eval()
        try:
            with torch.no_grad():
                features = net(torch.zeros(1, n_samples))[0].shape[-1]
        except Exception as exc:  # noqa: BLE001 - too short a clip for the convolutions: one line
            raise PipelineError(f"{field}.arch {arch} does not take clips of {n_samples} samples "
                                f"(preprocess.{modality}.seconds): {str(exc).splitlines()[0][:200]}") from None
        self.out = nn.Linear(features, dim)
        self.setup(net, freeze, lr_scale, checkpointing)

    def recipe(self) -> str:
        name = self.arch.upper()
        return (f"python -c \"import torch, torchaudio; torch.save(torchaudio.pipelines.{name}.get_model()"
                f".state_dict(), '{self.arch}.pth')\"")

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.float()
        if self.normalize:
            x = nn.functional.layer_norm(x, x.shape[-1:])
        hidden, _ = self.backbone(x)
        return hidden.mean(dim=1)


class TransformersEncoder(Backbone):
    """int (B, L) token ids + (B,) lengths -> (B, dim) through a Hugging Face transformer encoder (BERT,
    RoBERTa, DistilBERT, MiniLM, ...): the last hidden states averaged over the text's tokens, then a
    projection. The architecture comes from the model's ``config.json`` (kept in the fitted text state);
    ``weights`` is the model's folder, read with ``AutoModel.from_pretrained(folder, local_files_only=True)``.
    """

    head_keys = ("pooler.",)  # the [CLS] pooler: unused (mean pooling), so not trained either

    def __init__(self, modality: str, model_config: dict, dim: int, weights: str | None, freeze, lr_scale: float,
                 checkpointing: bool = False):
        super().__init__()
        transformers = require("transformers", "a Hugging Face encoder (arch: huggingface)")

        field = f"model.encoders.{modality}"
        self.modality, self.weights = modality, weights
        try:
            config = transformers.AutoConfig.for_model(**model_config)
            net = transformers.AutoModel.from_config(config, attn_implementation="eager")  # exports to ONNX as is
        except Exception as exc:  # noqa: BLE001 - a config transformers cannot build: one line
            raise PipelineError(f"{field}: the model's config.json does not build a transformers model "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        self.arch = model_config.get("model_type", type(net).__name__)
        if getattr(net, "pooler", None) is not None:
            net.pooler = None
        self.out = nn.Linear(config.hidden_size, dim)
        self.setup(net, freeze, lr_scale, checkpointing)

    def recipe(self) -> str:
        return ("python -c \"from transformers import AutoModel, AutoTokenizer; name='<model id>'; "
                "AutoModel.from_pretrained(name).save_pretrained('weights/<folder>'); "
                "AutoTokenizer.from_pretrained(name).save_pretrained('weights/<folder>')\"")

    def read_weights(self, path: Path, field: str) -> dict[str, torch.Tensor]:
        transformers = require("transformers", "a Hugging Face encoder (arch: huggingface)")

        if path.is_file():
            return read_state_dict(path, field)
        try:
            loaded = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a user's folder: one line
            raise PipelineError(f"{field}: {path} is not a transformers model folder "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        return loaded.state_dict()

    def embed(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        mask[:, 0] = True  # an absent text (length 0) attends to its first token: no all-masked softmax
        hidden = self.backbone(input_ids=ids.long(), attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)
