"""Does int8 make ONNX Runtime faster on this CPU? fp32 vs int8 for conv and linear blocks, side by side.

Each block is exported with torch.onnx.export, then quantized with ONNX Runtime: static QDQ
(per-channel int8 weights, uint8 activations, calibrated on random inputs) and, for linear blocks,
dynamic int8 as well. Every variant runs in the same process with the same thread count; the
report gives median latencies and the fp32 / int8 ratio (> 1: int8 is faster).

    python -m bench.int8_kernels [--threads 2] [--runs 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import nn

from mmpipe.io import write_json_atomic

REPORT = Path("reports/int8_kernels.json")


def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


BLOCKS = {  # name -> (module, input shape at batch 32)
    "conv 16-32-64 @32x32": (nn.Sequential(*conv_block(16, 32), *conv_block(32, 64), *conv_block(64, 64)), (32, 16, 32, 32)),
    "conv 64-128-128 @16x16": (nn.Sequential(*conv_block(64, 128), *conv_block(128, 128)), (32, 64, 16, 16)),
    "conv 1-16 stem @64x151": (nn.Sequential(*conv_block(1, 16), nn.MaxPool2d(2), *conv_block(16, 32)), (32, 1, 64, 151)),
    "mlp 512-1024-1024-256": (nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                            nn.Linear(1024, 256)), (32, 512)),
}


class RandomReader(CalibrationDataReader):
    def __init__(self, shape: tuple[int, ...], batches: int = 4):
        self.batches = iter([{"x": np.random.default_rng(i).standard_normal(shape, dtype=np.float32)}
                             for i in range(batches)])

    def get_next(self):
        return next(self.batches, None)


def median_ms(path: Path, x: np.ndarray, threads: int, runs: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(max(5, runs // 5)):
        session.run(None, {"x": x})
    times = []
    for _ in range(runs):
        tic = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - tic)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (module, shape)) in enumerate(BLOCKS.items()):
            fp32, pre, static, dynamic = (Path(tmp) / f"{i}_{k}.onnx" for k in ("fp32", "pre", "static", "dynamic"))
            x = torch.randn(*shape)
            torch.onnx.export(module.eval(), (x,), str(fp32), dynamo=True, external_data=False, input_names=["x"],
                              verbose=False)
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(static), RandomReader(shape), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            variants = {"fp32": fp32, "int8 static QDQ": static}
            if "mlp" in name:
                quantize_dynamic(str(fp32), str(dynamic), weight_type=QuantType.QInt8)
                variants["int8 dynamic"] = dynamic
            ms = {k: median_ms(p, x.numpy(), args.threads, args.runs) for k, p in variants.items()}
            rows[name] = {"median_ms": {k: round(v, 3) for k, v in ms.items()},
                          "fp32_over_int8": {k: round(ms["fp32"] / v, 2) for k, v in ms.items() if k != "fp32"}}
            print(f"{name:26s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
                  + "  ratio " + ", ".join(f"{v:.2f}" for v in rows[name]["fp32_over_int8"].values()), flush=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()
                    if f.startswith(("avx", "vnni", "amx"))}) if Path("/proc/cpuinfo").exists() else []
    write_json_atomic(REPORT, {"machine": platform.processor() or platform.machine(), "cpu_flags": flags,
                               "onnxruntime": ort.__version__, "threads": args.threads, "batch": 32, "blocks": rows})
    print(json.dumps({"cpu_flags": flags}), f"-> {REPORT}")


if __name__ == "__main__":
    main()
