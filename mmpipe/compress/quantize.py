"""int8 post-training static quantization in ONNX Runtime (QDQ, per-channel weights), with an
accuracy budget: when int8 loses too much, the most sensitive layers stay in fp32 and it retries.

Which layers are candidates is either all of them or, with ``layers: not_slower``, those whose int8
form is not measured slower on this machine: on CPUs without VNNI, ONNX Runtime's int8 convolutions
plus the layout changes around them can be slower than its blocked fp32 kernels (bench.int8_kernels),
so quantizing everything makes the model smaller but slower. Each layer is quantized alone and timed
against the fp32 model; per-layer effects are not strictly additive, so the final variant is
measured again as a whole.

``quantize.dynamic`` adds a second int8 form, ONNX Runtime's dynamic quantization: int8 weights of
every MatMul and Gather (the embedding tables), activations quantized per batch at run time, no
calibration. It is ONNX Runtime's advice for transformers, and measured so on them (docs/benchmarks.md).

Sensitivity is measured, not guessed: each quantizable node is quantized alone and ranked by how
far the model's validation logits move from fp32 (mean squared difference). Retries keep the top
1, 2, 4, ... nodes in fp32 until the accuracy drop fits the budget.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

QUANTIZABLE = ("Conv", "Gemm", "MatMul")
DYNAMIC = ("MatMul", "Gather")  # dynamic quantization: the linear layers of transformers and the embedding tables
CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}


class FeedsReader(CalibrationDataReader):
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def prepare(fp32_path: Path, out_path: Path) -> None:
    """ONNX Runtime's pre-processing (graph optimisation, shape inference) before quantization."""
    # symbolic shape inference cannot follow every op of the exported graph; ONNX's own is enough here
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)


def quantizable_nodes(path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type in QUANTIZABLE]


def quantize(prepared: Path, out_path: Path, calibration: list[dict[str, np.ndarray]], method: str = "minmax",
             exclude: list[str] | None = None, include: list[str] | None = None) -> None:
    quantize_static(str(prepared), str(out_path), FeedsReader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CALIBRATION[method], nodes_to_exclude=exclude or [],
                    nodes_to_quantize=include or [])


def quantize_dynamic_int8(prepared: Path, out_path: Path) -> None:
    """Dynamic int8 (see the module docstring): per-channel int8 weights of every MatMul and Gather."""
    quantize_dynamic(str(prepared), str(out_path), op_types_to_quantize=list(DYNAMIC), per_channel=True,
                     weight_type=QuantType.QInt8)


def _each_alone(prepared: Path, calibration: list[dict[str, np.ndarray]], method: str,
                nodes: list[str]) -> Iterator[tuple[str, Path]]:
    """Yield (node, a copy of the model with only that node quantized)."""
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single.onnx"
        for node in nodes:
            quantize(prepared, single, calibration, method, include=[node])
            yield node, single


def sensitivity(prepared: Path, calibration: list[dict[str, np.ndarray]], method: str,
                logits_of: Callable[[Path], np.ndarray], nodes: list[str] | None = None) -> list[tuple[str, float]]:
    """``nodes`` (default: every quantizable node), most sensitive first, with the logit MSE each
    causes when quantized alone."""
    reference = logits_of(prepared)
    scores = [(node, float(np.mean((logits_of(single) - reference) ** 2)))
              for node, single in _each_alone(prepared, calibration, method, nodes or quantizable_nodes(prepared))]
    return sorted(scores, key=lambda item: -item[1])


def latency_gains(prepared: Path, calibration: list[dict[str, np.ndarray]], method: str,
                  time_of: Callable[[Path], float], rounds: int = 3) -> list[tuple[str, float]]:
    """Quantizable nodes with the share of the fp32 model's time each saves when quantized alone
    (negative: int8 is slower). The fp32 model is timed next to each candidate, ``rounds`` times, and
    the median taken, so that drift in machine load cancels and one slow run does not decide."""
    gains = []
    for node, single in _each_alone(prepared, calibration, method, quantizable_nodes(prepared)):
        pairs = [(time_of(prepared), time_of(single)) for _ in range(rounds)]
        gains.append((node, round(float(np.median([(ref - q) / ref for ref, q in pairs])), 4)))
    return gains


def quantize_within_budget(prepared: Path, out_path: Path, calibration: list[dict[str, np.ndarray]], method: str,
                           accuracy_of: Callable[[Path], float], logits_of: Callable[[Path], np.ndarray],
                           fp32_accuracy: float, max_drop: float, log: Callable[[dict], None],
                           candidates: list[str] | None = None) -> dict | None:
    """Write the int8 model to ``out_path`` and return its trial record, or None when no trial fits.

    ``candidates``: the nodes that may be quantized (None: every quantizable node)."""
    candidates = quantizable_nodes(prepared) if candidates is None else candidates
    if not candidates:
        return None
    quantize(prepared, out_path, calibration, method, include=candidates)
    trial = {"excluded": [], "accuracy": accuracy_of(out_path)}
    log(trial)
    if fp32_accuracy - trial["accuracy"] <= max_drop:
        return trial
    ranked = [node for node, _ in sensitivity(prepared, calibration, method, logits_of, candidates)]
    keep = 1
    while keep < len(ranked):
        excluded = ranked[:keep]
        quantize(prepared, out_path, calibration, method, include=[n for n in candidates if n not in excluded])
        trial = {"excluded": excluded, "accuracy": accuracy_of(out_path)}
        log(trial)
        if fp32_accuracy - trial["accuracy"] <= max_drop:
            return trial
        keep *= 2
    out_path.unlink(missing_ok=True)
    return None
