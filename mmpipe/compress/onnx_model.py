"""The fusion model as an ONNX graph: export, the input contract, and running it in ONNX Runtime.

Input contract of every exported model (what the deployment predictor feeds), batch axis dynamic:
the arrays of each of the model's modalities, in the model's modality order and each modality's
array order (its featurizer's ``arrays``: name -> shape, stored dtype), entering with
``model_dtype(stored)`` (8-bit pixels stay uint8, integers int64, floats float32), then

    available    bool    (B, n)         one column per modality of the model, in its order

With the built-in modalities: image uint8 (B, C, H, W), text int64 (B, L), text_length int64 (B,),
audio float32 (B, M, T). Output: ``logits`` (B, n_classes). Normalisation lives inside the graph
(it is part of the model), so the predictor feeds raw features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mmpipe.modalities.base import model_dtype
from mmpipe.training.model_io import to_model_inputs

def input_dtypes(model: nn.Module) -> dict[str, np.dtype]:
    """The graph's inputs of ``model`` (a FusionModel), in order, with their dtypes."""
    states = model.config["states"]
    dtypes = {name: model_dtype(states[m]["arrays"][name]["dtype"]) for m in model.modalities for name in model.arrays[m]}
    return dtypes | {"available": np.dtype(np.bool_)}


class TensorArgsModel(nn.Module):
    """The exporter traces tensor arguments; the fusion model takes one dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = list(input_dtypes(model))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.names, tensors)))


def onnx_feeds(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, np.ndarray]:
    """A loader batch as ``model``'s ONNX inputs (dtypes of the contract, availability of its modalities)."""
    inputs = to_model_inputs(batch, model.modalities, torch.device("cpu"))
    return {name: inputs[name].numpy().astype(dtype, copy=False) for name, dtype in input_dtypes(model).items()}


def export_onnx(model: nn.Module, example: dict[str, np.ndarray], path: Path, wrapper: nn.Module | None = None,
                output: str = "logits") -> None:
    """Export ``model`` (eval mode, CPU) to one self-contained ONNX file with a dynamic batch axis. ``wrapper``:
    a module taking the inputs positionally (its ``names``; default: the fusion model's contract), ``output``:
    the graph output's name."""
    wrapper = (wrapper or TensorArgsModel(model.cpu())).cpu().eval()
    args = tuple(torch.from_numpy(example[name]) for name in wrapper.names)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        torch.onnx.export(wrapper, args, str(path), dynamo=True, external_data=False, optimize=True,
                          verbose=False, input_names=wrapper.names, output_names=[output],
                          dynamic_shapes=(tuple({0: batch} for _ in args),))
    except torch.onnx.OnnxExporterError:
        # torch.export cannot decompose some backbones (torchaudio's WavLM attention views a transposed
        # tensor): the TorchScript exporter traces them; export's parity check verifies the graph either way
        path.unlink(missing_ok=True)
        torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=18, input_names=wrapper.names,
                          output_names=[output], dynamic_axes={name: {0: "batch"} for name in [*wrapper.names, output]})


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU inference session; ``threads`` > 0 fixes the intra-op thread count (for comparable timings)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run(["logits"], {k: v[i:i + batch_size] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch_size)])
