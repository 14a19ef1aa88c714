"""Compression of the trained fusion model into deployable ONNX variants, each measured.

fp32 (the trained model, exported) -> pruned (optional; fine-tuned) -> int8 (static QDQ of the
pruned model, or of fp32 when not pruning), every variant scored on the validation split (the
accuracy budget) and the test split (for the record), with file and gzip size, parameters, MACs,
sparsity and CPU latency in ONNX Runtime at a fixed thread count. PyTorch eager fp32 latency is
measured too, as the reference a user would otherwise ship.

Among the variants whose validation accuracy is within ``max_accuracy_drop`` of fp32's (fp32
always is), the chosen one is the smallest file (``prefer: size``) or the fastest at batch 32
(``prefer: latency``). They differ where int8 kernels are no faster than fp32 ones (CPUs without
VNNI: docs/benchmarks.md).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mmpipe.compress import prune, quantize
from mmpipe.compress.onnx_model import export_onnx, onnx_feeds, run_logits, session
from mmpipe.features.loader import FeatureSet
from mmpipe.params import ModelParams, TrainParams
from mmpipe.timing import latency_ms
from mmpipe.models.model_io import load_model, to_model_inputs
from mmpipe.models.train import train

CHOSEN_FILE = "model.onnx"
# quantize.layers: not_slower keeps a layer in fp32 when int8 costs more than 2 % of the batch time; layers
# within that band (timing noise on a busy machine) are quantized, since int8 still shrinks the file
MAX_INT8_SLOWDOWN = 0.02


def _feeds(data: FeatureSet, positions: np.ndarray, model: torch.nn.Module) -> dict[str, np.ndarray]:
    return onnx_feeds(data.get(positions), model)


def _batch(feeds: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A batch of exactly ``size`` rows (repeating the feeds' rows when there are fewer)."""
    return {k: np.resize(v, (size, *v.shape[1:])) for k, v in feeds.items()}


def _latency(sess, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    return latency_ms(lambda: sess.run(["logits"], feeds), runs)


def _describe(path: Path, model: torch.nn.Module, example: dict, feeds: dict[str, dict], labels: dict,
              threads: int, runs: int) -> dict[str, Any]:
    sess = session(path, threads)
    out = {split: float((run_logits(sess, f).argmax(axis=1) == labels[split]).mean()) for split, f in feeds.items()}
    return {"val_accuracy": out["val"], "test_accuracy": out["test"],
            "file_bytes": path.stat().st_size, "gzip_bytes": len(gzip.compress(path.read_bytes(), mtime=0)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "macs_per_sample": prune.macs(model, example) // len(example["label"]),
            "sparsity": round(prune.sparsity(model), 4),
            "latency_ms": {f"batch_{size}": _latency(sess, _batch(feeds["val"], size), runs) for size in (1, 32)}}


def compress(params, features_root: Path, model_dir: Path, out_dir: Path,
             log: Callable[[str, dict], None] = lambda name, row: None, progress=print) -> dict[str, Any]:
    """Write the variants (``<name>.onnx``) and the chosen one (``model.onnx``) to ``out_dir``; return metrics."""
    torch.manual_seed(params.seed)
    if params.threads:
        torch.set_num_threads(params.threads)
    model = load_model(model_dir)
    modalities = model.modalities
    splits = {s: FeatureSet(features_root, split=s) for s in ("train", "val", "test")}
    feeds = {s: _feeds(splits[s], np.arange(len(splits[s])), model) for s in ("val", "test")}
    labels = {s: splits[s].labels for s in ("val", "test")}
    example = to_model_inputs(splits["val"].get(np.arange(min(32, len(splits["val"])))), modalities, torch.device("cpu"))
    rng = np.random.default_rng(params.seed)
    picks = np.sort(rng.choice(len(splits["train"]), min(params.quantize.calibration_samples, len(splits["train"])),
                               replace=False))
    calibration = [_feeds(splits["train"], picks[i:i + 32], model) for i in range(0, len(picks), 32)]

    variants: dict[str, dict] = {}
    models = {"fp32": model}

    def add(name: str, torch_model: torch.nn.Module, path: Path) -> None:
        variants[name] = _describe(path, torch_model, example, feeds, labels, params.threads, params.latency_runs)
        v = variants[name]
        progress(f"compress[{name}]: val {v['val_accuracy']:.4f}, {v['file_bytes'] / 1e6:.2f} MB, "
                 f"{v['macs_per_sample'] / 1e6:.1f} MMAC/sample, batch-32 p50 {v['latency_ms']['batch_32']['p50']:.2f} ms")

    export_onnx(model, feeds["val"], out_dir / "fp32.onnx")
    add("fp32", model, out_dir / "fp32.onnx")
    reference = variants["fp32"]["val_accuracy"]
    fits = lambda name: reference - variants[name]["val_accuracy"] <= params.max_accuracy_drop  # noqa: E731

    base = "fp32"
    if params.prune.method != "none":
        if params.prune.method == "structured":
            pruned = prune.structured(model, params.prune.amount, example)
        else:
            pruned = prune.unstructured(model, params.prune.amount)
        if params.prune.finetune_epochs:
            tuning = TrainParams(seed=params.seed, device="cpu", epochs=params.prune.finetune_epochs,
                                 batch_size=params.prune.finetune_batch_size, lr=params.prune.finetune_lr,
                                 warmup_epochs=0.0, patience=params.prune.finetune_epochs, threads=params.threads)
            pruned = train(tuning, ModelParams(**model.config["model"]), features_root, modalities, None, None,
                           on_epoch=lambda epoch, row: log("finetune", row), init_model=pruned)["model"]
            if params.prune.method == "unstructured":  # fine-tuning regrows pruned weights: prune again
                pruned = prune.unstructured(pruned, params.prune.amount)
        models["pruned"] = pruned
        export_onnx(pruned, feeds["val"], out_dir / "pruned.onnx")
        add("pruned", pruned, out_dir / "pruned.onnx")
        if fits("pruned"):
            base = "pruned"

    if params.quantize.enabled:
        prepared = out_dir / ".prepared.onnx"
        quantize.prepare(out_dir / f"{base}.onnx", prepared)
        logits_of = lambda path: run_logits(session(path), feeds["val"])  # noqa: E731
        accuracy_of = lambda path: float((logits_of(path).argmax(axis=1) == labels["val"]).mean())  # noqa: E731
        candidates, slower, gains = None, [], []
        if params.quantize.layers == "not_slower":
            batch_32 = _batch(feeds["val"], 32)
            time_of = lambda path: _latency(session(path, params.threads), batch_32, params.latency_runs)["p50"]  # noqa: E731
            gains = quantize.latency_gains(prepared, calibration, params.quantize.calibration, time_of)
            for step, (node, saved) in enumerate(gains):
                log("int8_latency_probe", {"saved_share": saved, "step": step})
                progress(f"compress[int8 probe]: {node} alone saves {saved:+.1%} of the batch-32 time")
            candidates = [node for node, saved in gains if saved >= -MAX_INT8_SLOWDOWN]
            slower = [node for node, saved in gains if saved < -MAX_INT8_SLOWDOWN]
        trial = quantize.quantize_within_budget(
            prepared, out_dir / "int8.onnx", calibration, params.quantize.calibration, accuracy_of, logits_of,
            reference, params.max_accuracy_drop, lambda row: log("int8_trial", row), candidates)
        prepared.unlink()
        if trial is not None:
            add("int8", models[base], out_dir / "int8.onnx")
            variants["int8"] |= {"from": base, "layers": params.quantize.layers,
                                 "fp32_nodes": trial["excluded"], "fp32_nodes_slower_in_int8": slower,
                                 "time_saved_alone": dict(gains)}

    eligible = [name for name in variants if fits(name)]
    if params.prefer == "size":
        chosen = min(eligible, key=lambda name: variants[name]["file_bytes"])
    else:
        chosen = min(eligible, key=lambda name: variants[name]["latency_ms"]["batch_32"]["p50"])
    shutil.copyfile(out_dir / f"{chosen}.onnx", out_dir / CHOSEN_FILE)

    eager = model.eval()
    with torch.no_grad():
        pytorch = {f"batch_{b}": latency_ms(lambda b=b: eager({k: v[:b] for k, v in example.items()}),
                                            params.latency_runs) for b in (1, 32) if b <= len(example["label"])}
    fp32, shipped = variants["fp32"], variants[chosen]
    headline = {"variant": chosen, "file_bytes": shipped["file_bytes"], "gzip_bytes": shipped["gzip_bytes"],
                "val_accuracy": shipped["val_accuracy"], "test_accuracy": shipped["test_accuracy"],
                "batch_1_p50_ms": shipped["latency_ms"]["batch_1"]["p50"],
                "batch_32_p50_ms": shipped["latency_ms"]["batch_32"]["p50"],
                "smaller_than_fp32_onnx": round(fp32["file_bytes"] / shipped["file_bytes"], 2),
                "faster_than_fp32_onnx_batch_32": round(fp32["latency_ms"]["batch_32"]["p50"]
                                                        / shipped["latency_ms"]["batch_32"]["p50"], 2)}
    return {"shipped": headline, "variants": variants, "chosen": chosen, "prefer": params.prefer, "base_for_int8": base,
            "pytorch_fp32_latency_ms": pytorch, "threads": params.threads,
            "max_accuracy_drop": params.max_accuracy_drop}
