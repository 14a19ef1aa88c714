"""Pretrained image backbones on this machine: embedding throughput, training speed, ONNX latency.

For each torchvision architecture (random weights: speed does not depend on their values), an
image-only fusion model is built exactly as the pipeline builds it (``model.encoders.image.arch``)
at ``--size`` pixels, and measured side by side:

  embed_samples_per_s       forward of the backbone alone, no grad, batch 32 (what an embedding
                            cache would cost per sample in preprocess)
  train_samples_per_s       AdamW steps of the whole model, ``freeze: none`` (fine-tuning) vs
                            ``freeze: all`` (frozen backbone, projection + fusion trained), batch 32
  latency_ms                ONNX Runtime p50 at batch 1 and 32: fp32, and int8 (static QDQ, every
                            Conv/Gemm/MatMul, the compress stage's quantizer), vs PyTorch eager fp32
  file_mb                   fp32 and int8 ONNX file sizes

    python -m bench.backbones --archs resnet18 mobilenet_v3_large efficientnet_b0 --size 224

Writes reports/backbones.json and prints a table. Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmpipe import params
from mmpipe.compress import quantize
from mmpipe.compress.onnx_model import export_onnx, onnx_feeds, session
from mmpipe.features.loader import available_key
from mmpipe.io import write_json_atomic
from mmpipe.models.model_io import to_model_inputs
from mmpipe.models.fusion import build_model, model_config
from mmpipe.models.train import param_groups
from mmpipe.timing import latency_ms

REPORT = Path("reports/backbones.json")


def image_model(arch: str, size: int, freeze: str) -> torch.nn.Module:
    state = {"array_order": ["image"], "arrays": {"image": {"dtype": "uint8", "shape": [3, size, size]}},
             "mean": [0.5] * 3, "std": [0.25] * 3}
    model_params = params.validate("model", {"encoders": {"image": {"arch": arch, "freeze": freeze}}})
    return build_model(model_config(["image"], {"image": state}, model_params.model_dump(), [str(i) for i in range(10)]))


def batch_of(size: int, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader batch (what FeatureSet.batches yields) of random pixels."""
    rng = np.random.default_rng(seed)
    return {"image": torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)),
            available_key("image"): torch.ones(n, dtype=torch.bool), "label": torch.from_numpy(rng.integers(0, 10, n))}


def samples_per_s(step, n: int, repeats: int) -> float:
    step()  # warm-up
    tic = time.perf_counter()
    for _ in range(repeats):
        step()
    return n * repeats / (time.perf_counter() - tic)


def train_speed(arch: str, size: int, freeze: str, batch: dict, repeats: int) -> float:
    model = image_model(arch, size, freeze).train()
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(batch), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return samples_per_s(step, len(batch["label"]), repeats)


def measure(arch: str, size: int, repeats: int, runs: int, threads: int) -> dict:
    model = image_model(arch, size, "none").eval()
    loader_batch = batch_of(size, 32)
    batch = to_model_inputs(loader_batch, ["image"], torch.device("cpu"))
    backbone = model.encoders["image"]
    with torch.no_grad():
        embed = samples_per_s(lambda: backbone(batch["image"]), 32, repeats)
    row = {"parameters": sum(p.numel() for p in model.parameters()), "embed_samples_per_s": round(embed, 1),
           "train_samples_per_s": {f: round(train_speed(arch, size, f, batch, repeats), 1) for f in ("none", "all")}}
    row["frozen_vs_finetune_train_speedup"] = round(row["train_samples_per_s"]["all"] / row["train_samples_per_s"]["none"], 2)
    feeds = onnx_feeds(loader_batch, model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "prepared", "int8"))
        export_onnx(model, {k: v[:2] for k, v in feeds.items()}, fp32)
        quantize.prepare(fp32, prepared)
        calibration = [onnx_feeds(batch_of(size, 16, seed), model) for seed in (1, 2)]
        quantize.quantize(prepared, int8, calibration)
        row["file_mb"] = {n: round(p.stat().st_size / 2**20, 2) for n, p in (("fp32", fp32), ("int8", int8))}
        latency = {}
        for b in (1, 32):
            fed = {k: v[:b] for k, v in feeds.items()}
            for name, path in (("fp32_onnx", fp32), ("int8_onnx", int8)):
                sess = session(path, threads)
                latency[f"{name}@{b}"] = latency_ms(lambda: sess.run(["logits"], fed), runs)["p50"]
            with torch.no_grad():
                eager = {k: v[:b] for k, v in batch.items()}
                latency[f"pytorch@{b}"] = latency_ms(lambda: model(eager), runs)["p50"]
    row["latency_ms"] = {k: round(v, 2) for k, v in latency.items()}
    row["int8_vs_fp32_onnx_speedup_batch_32"] = round(latency["fp32_onnx@32"] / latency["int8_onnx@32"], 2)
    row["fp32_onnx_vs_pytorch_speedup_batch_32"] = round(latency["pytorch@32"] / latency["fp32_onnx@32"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per throughput figure")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per latency figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    report = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                         f"{'cuda' if torch.cuda.is_available() else 'cpu'} (this benchmark runs on the CPU)",
              "size": args.size, "archs": {}}
    for arch in args.archs:
        report["archs"][arch] = measure(arch, args.size, args.repeats, args.runs, args.threads)
        r = report["archs"][arch]
        print(f"{arch:20s} {r['parameters'] / 1e6:6.1f} M params | embed {r['embed_samples_per_s']:7.1f}/s | "
              f"train fine-tune {r['train_samples_per_s']['none']:6.1f}/s, frozen {r['train_samples_per_s']['all']:6.1f}/s "
              f"({r['frozen_vs_finetune_train_speedup']:.1f}x) | ONNX b32 fp32 {r['latency_ms']['fp32_onnx@32']:.0f} ms, "
              f"int8 {r['latency_ms']['int8_onnx@32']:.0f} ms ({r['int8_vs_fp32_onnx_speedup_batch_32']:.2f}x), "
              f"{r['file_mb']['fp32']:.1f} -> {r['file_mb']['int8']:.1f} MB", flush=True)
    write_json_atomic(REPORT, report)


if __name__ == "__main__":
    main()
