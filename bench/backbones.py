"""Pretrained backbones on this machine: embedding throughput, training speed, ONNX latency.

For each backbone (random weights: speed does not depend on their values) a single-modality fusion
model is built exactly as the pipeline builds it (``model.encoders.<modality>.arch``) and measured
side by side:

  embed_samples_per_s       forward of the encoder alone, no grad (what an embedding cache costs
                            per sample in preprocess)
  train_samples_per_s       AdamW steps of the whole model, ``freeze: none`` (fine-tuning) vs
                            ``freeze: all`` (frozen backbone, projection + fusion trained) vs
                            ``cached`` (``preprocess.<m>.embed``: the same steps on the backbone's
                            cached float16 output, as train runs them)
  cached_10_epochs_vs_finetune  time of 10 fine-tuning epochs / (one embedding pass + 10 epochs on the
                            cache): the whole cost of the cache, its one-off embedding included
  latency_ms                ONNX Runtime p50 at batch 1 and ``--batch``: fp32, and int8 (static QDQ,
                            every Conv/Gemm/MatMul, the compress stage's quantizer), vs PyTorch eager fp32;
                            with ``--dynamic`` also ``int8_dynamic``: ONNX Runtime's dynamic quantization
                            of MatMul and Gather (the embedding tables), its usual advice for transformers
  file_mb                   fp32 and int8 ONNX file sizes

Backbones are ``modality:arch``: ``image:<torchvision classifier>`` at ``--size`` pixels,
``audio:<torchaudio speech encoder>`` on ``--seconds`` of 16 kHz waveform, ``text:<shape>`` a
Hugging Face BERT-family encoder of a known shape (``bert_base``: 12 layers x 768, ``minilm_l6``:
6 x 384, ``bert_mini``: 4 x 256) on ``--tokens`` tokens.

    python -m bench.backbones --archs image:resnet18 image:mobilenet_v3_large image:efficientnet_b0
    python -m bench.backbones --archs audio:wav2vec2_base text:minilm_l6 text:bert_base --batch 8

Writes reports/backbones.json (merged with earlier runs, per backbone) and prints a table. Times
hold for this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmpipe import params
from mmpipe.compress import quantize
from mmpipe.compress.onnx_model import export_onnx, onnx_feeds, session
from mmpipe.names import available_key, embedding_key
from mmpipe.io import write_json_atomic
from mmpipe.training.model_io import build_model, model_config, to_model_inputs
from mmpipe.training.train import param_groups
from mmpipe.timing import latency_ms

REPORT = Path("reports/backbones.json")
# BERT-family shapes (hidden size, layers, heads): the architecture is what costs, not the checkpoint
TEXT_SHAPES = {"bert_base": (768, 12, 12), "minilm_l6": (384, 6, 12), "bert_mini": (256, 4, 4)}


def family(name: str, size: int, seconds: float, tokens: int) -> tuple[str, dict, dict, Callable]:
    """``modality:arch`` -> (modality, fitted preprocess state, encoder params, batch maker(n, seed))."""
    modality, arch = name.split(":", 1)
    if modality == "image":
        state = {"array_order": ["image"], "arrays": {"image": {"dtype": "uint8", "shape": [3, size, size]}},
                 "mean": [0.5] * 3, "std": [0.25] * 3}
        return modality, state, {"arch": arch}, lambda n, rng: {
            "image": torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))}
    if modality == "audio":
        samples = int(seconds * 16000)
        state = {"array_order": ["audio"], "arrays": {"audio": {"dtype": "float16", "shape": [samples]}},
                 "features": "waveform", "sample_rate": 16000, "n_samples": samples}
        return modality, state, {"arch": arch}, lambda n, rng: {
            "audio": torch.from_numpy((0.1 * rng.standard_normal((n, samples))).astype(np.float16))}
    if modality == "text":
        hidden, layers, heads = TEXT_SHAPES[arch]
        config = {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden, "num_hidden_layers": layers,
                  "num_attention_heads": heads, "intermediate_size": 4 * hidden, "max_position_embeddings": 512}
        state = {"array_order": ["text", "text_length"], "arrays": {"text": {"dtype": "int32", "shape": [tokens]},
                                                                    "text_length": {"dtype": "int32", "shape": []}},
                 "kind": "pretrained", "vocab_size": 30522, "max_length": tokens, "model_config": config}
        return modality, state, {"arch": "huggingface"}, lambda n, rng: {
            "text": torch.from_numpy(rng.integers(1000, 30000, (n, tokens), dtype=np.int32)),
            "text_length": torch.full((n,), tokens, dtype=torch.int32)}
    raise SystemExit(f"unknown backbone {name!r}: image:<arch>, audio:<arch> or text:{'|'.join(TEXT_SHAPES)}")


def build(modality: str, state: dict, encoder: dict, freeze: str, **extra) -> torch.nn.Module:
    model_params = params.validate("model", {"encoders": {modality: {**encoder, "freeze": freeze, **extra}}})
    return build_model(model_config([modality], {modality: state}, model_params.model_dump(), [str(i) for i in range(10)]))


def batch_of(modality: str, arrays, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader batch (what FeatureSet.batches yields) of random inputs."""
    rng = np.random.default_rng(seed)
    return {**arrays(n, rng), available_key(modality): torch.ones(n, dtype=torch.bool),
            "label": torch.from_numpy(rng.integers(0, 10, n))}


def samples_per_s(step, n: int, repeats: int) -> float:
    step()  # warm-up
    tic = time.perf_counter()
    for _ in range(repeats):
        step()
    return n * repeats / (time.perf_counter() - tic)


def train_speed(spec: tuple, freeze: str, batch: dict, repeats: int) -> float:
    """AdamW steps/s x batch; ``freeze: cached`` = frozen, on the batch's cached embeddings."""
    modality, state, encoder, _ = spec
    model = build(modality, state, encoder, "all" if freeze == "cached" else freeze).train()
    if freeze == "cached":
        width = model.encoders[modality].out.in_features
        embeddings = torch.randn(len(batch["label"]), width).to(torch.float16)  # as the loader serves them
        batch = {embedding_key(modality): embeddings, "available": batch["available"], "label": batch["label"]}
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        loss = loss_fn(model(batch), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return samples_per_s(step, len(batch["label"]), repeats)


def measure(spec: tuple, batch_size: int, repeats: int, runs: int, threads: int, dynamic: bool = False) -> dict:
    modality, state, encoder, arrays = spec
    model = build(modality, state, encoder, "none").eval()
    loader_batch = batch_of(modality, arrays, batch_size)
    batch = to_model_inputs(loader_batch, [modality], torch.device("cpu"))
    inputs = [batch[name] for name in state["array_order"]]
    with torch.no_grad():
        embed = samples_per_s(lambda: model.encoders[modality](*inputs), batch_size, repeats)
    row = {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch_size,
           "embed_samples_per_s": round(embed, 1),
           "train_samples_per_s": {f: round(train_speed(spec, f, batch, repeats), 1) for f in ("none", "all", "cached")}}
    speed = row["train_samples_per_s"]
    row["frozen_vs_finetune_train_speedup"] = round(speed["all"] / speed["none"], 2)
    row["cached_vs_finetune_train_speedup"] = round(speed["cached"] / speed["none"], 1)
    row["cached_10_epochs_vs_finetune"] = round((10 / speed["none"]) / (1 / embed + 10 / speed["cached"]), 1)
    feeds = onnx_feeds(loader_batch, model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, int8 = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "prepared", "int8"))
        export_onnx(model, {k: v[:2] for k, v in feeds.items()}, fp32)
        quantize.prepare(fp32, prepared)
        calibration = [onnx_feeds(batch_of(modality, arrays, 8, seed), model) for seed in (1, 2)]
        quantize.quantize(prepared, int8, calibration, include=quantize.quantizable_nodes(prepared))  # as compress does
        variants = [("fp32_onnx", fp32), ("int8_onnx", int8)]
        if dynamic:  # as compress does with quantize.dynamic
            quantize.quantize_dynamic_int8(prepared, Path(tmp) / "int8_dynamic.onnx")
            variants.append(("int8_dynamic_onnx", Path(tmp) / "int8_dynamic.onnx"))
        row["file_mb"] = {n.removesuffix("_onnx"): round(p.stat().st_size / 2**20, 2)
                          for n, p in variants}
        latency = {}
        for b in (1, batch_size):
            fed = {k: v[:b] for k, v in feeds.items()}
            for name, path in variants:
                sess = session(path, threads)
                latency[f"{name}@{b}"] = latency_ms(lambda: sess.run(["logits"], fed), runs)["p50"]
            with torch.no_grad():
                eager = {k: v[:b] for k, v in batch.items()}
                latency[f"pytorch@{b}"] = latency_ms(lambda: model(eager), runs)["p50"]
    row["latency_ms"] = {k: round(v, 2) for k, v in latency.items()}
    b = batch_size
    row["int8_vs_fp32_onnx_speedup_batch"] = round(latency[f"fp32_onnx@{b}"] / latency[f"int8_onnx@{b}"], 2)
    if dynamic:
        row["int8_dynamic_vs_fp32_onnx_speedup_batch"] = round(latency[f"fp32_onnx@{b}"] / latency[f"int8_dynamic_onnx@{b}"], 2)
    row["fp32_onnx_vs_pytorch_speedup_batch"] = round(latency[f"pytorch@{b}"] / latency[f"fp32_onnx@{b}"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["image:resnet18", "image:mobilenet_v3_large", "image:efficientnet_b0"],
                        help="modality:arch (image:<torchvision>, audio:<torchaudio>, text:bert_base|minilm_l6|bert_mini)")
    parser.add_argument("--size", type=int, default=224, help="image side, pixels")
    parser.add_argument("--seconds", type=float, default=5.0, help="audio clip, seconds at 16 kHz")
    parser.add_argument("--tokens", type=int, default=64, help="text length, tokens")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per throughput figure")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per latency figure")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dynamic", action="store_true", help="also measure dynamic int8 (MatMul, Gather)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report["machine"] = (f"{platform.processor() or platform.machine()}, {args.threads} threads, "
                         f"{'cuda' if torch.cuda.is_available() else 'cpu'} (this benchmark runs on the CPU)")
    report.setdefault("archs", {})
    for name in args.archs:
        spec = family(name, args.size, args.seconds, args.tokens)
        r = measure(spec, args.batch, args.repeats, args.runs, args.threads, args.dynamic)
        r["input"] = {"image": f"{args.size} px", "audio": f"{args.seconds:g} s at 16 kHz",
                      "text": f"{args.tokens} tokens"}[spec[0]]
        report["archs"][name] = r
        b = args.batch
        print(f"{name:26s} {r['parameters'] / 1e6:6.1f} M params, {r['input']} | embed {r['embed_samples_per_s']:7.1f}/s | "
              f"train fine-tune {r['train_samples_per_s']['none']:6.1f}/s, frozen {r['train_samples_per_s']['all']:6.1f}/s "
              f"({r['frozen_vs_finetune_train_speedup']:.1f}x), cached {r['train_samples_per_s']['cached']:.0f}/s "
              f"({r['cached_vs_finetune_train_speedup']:.0f}x; 10 epochs with the embedding pass "
              f"{r['cached_10_epochs_vs_finetune']:.1f}x) | ONNX b{b} fp32 {r['latency_ms'][f'fp32_onnx@{b}']:.0f} ms, "
              f"int8 {r['latency_ms'][f'int8_onnx@{b}']:.0f} ms ({r['int8_vs_fp32_onnx_speedup_batch']:.2f}x), "
              f"{r['file_mb']['fp32']:.1f} -> {r['file_mb']['int8']:.1f} MB"
              + (f" | dynamic int8 {r['latency_ms'][f'int8_dynamic_onnx@{b}']:.0f} ms "
                 f"({r['int8_dynamic_vs_fp32_onnx_speedup_batch']:.2f}x), {r['file_mb']['int8_dynamic']:.1f} MB"
                 if args.dynamic else ""), flush=True)
        write_json_atomic(REPORT, report)


if __name__ == "__main__":
    main()
