"""The fusion model as an ONNX graph: export, the input contract, and running it in ONNX Runtime.

Input contract of every exported model (what the deployment predictor feeds), batch axis dynamic:

    image        uint8   (B, C, H, W)   pixels as preprocess stores them
    text         int64   (B, L)         token ids (tokenizer.json)
    text_length  int64   (B,)
    audio        float32 (B, M, T)      log-mel (logmel.py + mel_filters.npy)
    available    bool    (B, n)         one column per modality of the model, in its order

Only the arrays of the model's own modalities are inputs. Output: ``logits`` (B, n_classes).
Normalisation lives inside the graph (it is part of the model), so the predictor feeds raw features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from mmpipe.models.train import to_model_inputs

ONNX_DTYPES = {"image": np.uint8, "text": np.int64, "text_length": np.int64, "audio": np.float32, "available": np.bool_}
ARRAYS_OF = {"image": ["image"], "text": ["text", "text_length"], "audio": ["audio"]}


def input_names(modalities: list[str]) -> list[str]:
    return [name for m in modalities for name in ARRAYS_OF[m]] + ["available"]


class TensorArgsModel(nn.Module):
    """The exporter traces tensor arguments; the fusion model takes one dict."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names = input_names(model.modalities)

    def forward(self, image=None, text=None, text_length=None, audio=None, available=None) -> torch.Tensor:
        given = {"image": image, "text": text, "text_length": text_length, "audio": audio, "available": available}
        return self.model({k: v for k, v in given.items() if v is not None})


def onnx_feeds(batch: dict[str, torch.Tensor], modalities: list[str]) -> dict[str, np.ndarray]:
    """A loader batch as the model's ONNX inputs (dtypes of the contract, availability of its modalities)."""
    inputs = to_model_inputs(batch, modalities, torch.device("cpu"))
    return {name: inputs[name].numpy().astype(ONNX_DTYPES[name], copy=False) for name in input_names(modalities)}


def export_onnx(model: nn.Module, example: dict[str, np.ndarray], path: Path) -> None:
    """Export ``model`` (eval mode, CPU) to one self-contained ONNX file with a dynamic batch axis."""
    wrapper = TensorArgsModel(model.cpu()).eval()
    kwargs = {name: torch.from_numpy(example[name]) for name in wrapper.names}
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    torch.onnx.export(wrapper, (), str(path), kwargs=kwargs, dynamo=True, external_data=False, optimize=True,
                      verbose=False, input_names=wrapper.names, output_names=["logits"],
                      dynamic_shapes={name: {0: batch} for name in kwargs})


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
