"""Pruning of the fusion model: unstructured (global magnitude: zeros, same shapes) or structured
(whole channels removed with torch-pruning's dependency graph, so layers physically shrink).

What is never pruned, and why: each encoder's output projection and the placeholders (the fused
vector size ``dim`` is shared by all modalities and by the fusion), the classifier's last layer
(one output per class), embeddings (the tokenizer's vocabulary), attention fusion's transformer
(its heads are coupled through the key-padding mask), the attention blocks of pretrained
transformer backbones (their heads are a reshape of the projections' channels), and a backbone's
frozen blocks (``freeze``): the fine-tune cannot train them back, and they keep computing what the
embedding cache holds, so the fine-tune still runs on the cache.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmpipe.errors import PipelineError


def macs(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass over ``example`` (torch's FLOP counter / 2)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero weights in the Conv and Linear layers."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    return float(sum((w == 0).sum().item() for w in weights) / max(sum(w.numel() for w in weights), 1))


def _protected(model: nn.Module) -> list[nn.Module]:
    keep = [encoder.out for encoder in model.encoders.values() if hasattr(encoder, "out")]
    keep.append(model.head[-1])
    keep += [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if hasattr(model, "transformer"):
        keep.append(model.transformer)
    keep += [m for m in model.modules() if is_attention(m)]
    keep += [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))
             and not any(p.requires_grad for p in m.parameters(recurse=False))]  # frozen blocks
    return keep


def is_attention(module: nn.Module) -> bool:
    """Multi-head attention (torch's, torchaudio's wav2vec2/WavLM, Hugging Face's): its query/key/value
    channels are split into heads by a reshape that channel pruning would break."""
    return isinstance(module, nn.MultiheadAttention) or hasattr(module, "num_heads") \
        or hasattr(module, "num_attention_heads")


def unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` share of smallest-magnitude Conv/Linear weights, globally across layers."""
    pruned = copy.deepcopy(model)
    protected = {id(m) for m in _protected(pruned)}
    layers = [(m, "weight") for m in pruned.modules()
              if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and id(m) not in protected]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in layers:
        torch_prune.remove(module, name)  # make the zeros permanent (no mask buffers in the export)
    return pruned


def structured(model: nn.Module, amount: float, example: dict[str, torch.Tensor],
               encoder_amounts: dict[str, float] | None = None) -> nn.Module:
    """Remove the ``amount`` share of channels (L2 magnitude of each coupled group) from every
    prunable layer (a modality's encoder, or one of its layers: its own share in ``encoder_amounts``, by
    modality or ``modality.layer``: ``own_keeps``); torch-pruning keeps the coupled layers (BatchNorm, the
    next conv) consistent.
    Channel counts are kept multiples of 8: ONNX Runtime's AVX2 convolutions work on blocks of 8
    channels, so 11 channels cost as much as 16 (measured: halving MACs gained only 1.17x otherwise)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    # torch-pruning follows the autograd graph: frozen parameters (a pretrained backbone's leading
    # blocks) would hide their layers from it and break residual couplings; freeze them again after
    frozen = [name for name, p in pruned.named_parameters() if not p.requires_grad]
    protected = _protected(pruned)
    pruned.requires_grad_(True)
    pruner = tp.pruner.MagnitudePruner(
        pruned, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.0, pruning_ratio_dict=nearest_ratios(pruned, 1.0 - amount, protected, encoder_amounts),
        round_to=8, ignored_layers=protected, unwrapped_parameters=[(pruned.placeholders, 1)],
        forward_fn=lambda m, inputs: m(inputs))
    pruner.step()
    for name in frozen:
        pruned.get_parameter(name).requires_grad_(False)
    return pruned


def kept_channels(channels: int, keep: float) -> int:
    """``keep`` of ``channels`` as the nearest multiple of 8 (a tie rounds down), at least 8; layers of 8 or
    fewer channels stay whole."""
    if channels <= 8:
        return channels
    return min(channels, max(8, math.ceil(channels * keep / 8 - 0.5) * 8))


def nearest_ratios(model: nn.Module, keep: float, protected: list[nn.Module],
                   encoder_amounts: dict[str, float] | None = None) -> dict[nn.Module, float]:
    """torch-pruning's per-layer ratios that keep ``kept_channels`` of each prunable Conv/Linear layer. Why not
    its ``round_to`` alone: it rounds the kept channels down, and a layer whose share rounds down to 0 is not
    pruned at all, so at a 0.45 share a 32-channel conv kept 8 (a quarter) while the 16-channel conv before it
    kept all 16 (docs/architecture.md "Compression")."""
    skip = {id(m) for m in protected}
    own = own_keeps(model, encoder_amounts or {})
    ratios = {}
    for layer in model.modules():
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) and id(layer) not in skip:
            n = layer.out_channels if isinstance(layer, (nn.Conv1d, nn.Conv2d)) else layer.out_features
            # torch-pruning keeps int(n * (1 - ratio)) channels: a quarter channel above the count survives int()
            ratios[layer] = max(0.0, 1.0 - (kept_channels(n, own.get(id(layer), keep)) + 0.25) / n)
    return ratios


def own_keeps(model: nn.Module, encoder_amounts: dict[str, float]) -> dict[int, float]:
    """{id(layer): share of its channels kept} for the layers ``encoder_amounts`` names: a modality (every layer
    of its encoder) or ``modality.path`` (the layers under that module of the encoder, e.g. image.features.3:
    the PyTorch path printed by ``print(model.encoders.image)``). A layer takes the most specific key's share, so
    ``{image: 0.4, image.features.3: 0.5}`` prunes the image encoder at 0.4 but that block at 0.5. A modality the
    model lacks is skipped; a path its encoder lacks is refused with one line listing the ones it has."""
    own = {}
    for key in sorted(encoder_amounts, key=lambda k: k.count(".")):  # the more specific keys last, so they win
        m, _, path = key.partition(".")
        if m not in model.encoders:
            continue
        encoder = model.encoders[m]
        if path:
            try:
                encoder = encoder.get_submodule(path)
            except AttributeError:
                layers = [name for name, layer in model.encoders[m].named_modules()
                          if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear))]
                raise PipelineError(f"compress.distill.encoder_width_scale: {key}: the {m} encoder has no layer "
                                    f"{path} (its layers: {', '.join(layers)})") from None
        own |= {id(layer): 1.0 - encoder_amounts[key] for layer in encoder.modules()}
    return own
