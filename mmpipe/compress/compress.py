"""Compression of the trained fusion model into deployable ONNX variants, each measured.

fp32 (the trained model, exported) -> pruned (optional; fine-tuned) -> int8 (static QDQ of the
pruned model, or of fp32 when not pruning) and, with ``quantize.dynamic``, int8_dynamic (ONNX
Runtime's dynamic quantization of the same base), every variant scored on the validation split (the
accuracy budget) and the test split (for the record), with file and gzip size, parameters, MACs,
sparsity and CPU latency in ONNX Runtime at a fixed thread count. PyTorch eager fp32 latency is
measured too, as the reference a user would otherwise ship. "Accuracy" here is the headline metric of the
model's target (accuracy, R², micro-F1 at the model's thresholds): the rows name it (``val_<headline>``).

Among the variants whose validation headline metric is within ``max_accuracy_drop`` of fp32's (fp32
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
from mmpipe.training.model_io import load_model, to_model_inputs
from mmpipe.training.train import train

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


class Variants:
    """The ONNX variants written so far, each measured the same way (``describe``), and the accuracy budget."""

    def __init__(self, model: torch.nn.Module, data: "CompressInputs", params, progress):
        self.data, self.params, self.progress = data, params, progress
        self.rows: dict[str, dict] = {}
        self.failed: dict[str, str] = {}  # variants left out: why
        self.models = {"fp32": model}

    def add(self, name: str, torch_model: torch.nn.Module, path: Path) -> None:
        self.rows[name] = describe(path, torch_model, self.data, self.params.threads, self.params.latency_runs)
        v = self.rows[name]
        self.progress(f"compress[{name}]: val {self.data.headline} {v[self.data.val_key]:.4f}, {v['file_bytes'] / 1e6:.2f} MB, "
                      f"{v['macs_per_sample'] / 1e6:.1f} MMAC/sample, "
                      f"batch-32 p50 {v['latency_ms']['batch_32']['p50']:.2f} ms")

    def fits(self, name: str) -> bool:
        """Within ``max_accuracy_drop`` of fp32's validation headline metric (fp32 always is)."""
        key = self.data.val_key
        return self.rows["fp32"][key] - self.rows[name][key] <= self.params.max_accuracy_drop


class CompressInputs:
    """What every variant is measured on: ONNX feeds and labels of val and test, a 32-sample example batch
    (MACs, eager latency) and calibration batches drawn (seeded) from the train split."""

    def __init__(self, features_root: Path, model: torch.nn.Module, seed: int, calibration_samples: int):
        splits = {s: FeatureSet(features_root, split=s) for s in ("train", "val", "test")}
        self.feeds = {s: _feeds(splits[s], np.arange(len(splits[s])), model) for s in ("val", "test")}
        self.labels = {s: splits[s].labels for s in ("val", "test")}
        self.target = model.target  # the fp32 model's (set: its tuned thresholds judge every variant)
        self.headline = self.target.HEADLINE
        self.val_key, self.test_key = f"val_{self.headline}", f"test_{self.headline}"
        self.example = to_model_inputs(splits["val"].get(np.arange(min(32, len(splits["val"])))), model.modalities,
                                       torch.device("cpu"))
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(len(splits["train"]), min(calibration_samples, len(splits["train"])), replace=False))
        self.calibration = [_feeds(splits["train"], picks[i:i + 32], model) for i in range(0, len(picks), 32)]

    def score(self, outputs: np.ndarray, split: str) -> float:
        """The headline metric of raw network ``outputs`` (an ONNX variant's) on ``split``."""
        return self.target.headline(self.target.scores(torch.from_numpy(outputs)).numpy(), self.labels[split])


def describe(path: Path, model: torch.nn.Module, data: CompressInputs, threads: int, runs: int) -> dict[str, Any]:
    """The headline metric (val, test), file and gzip size, parameters, MACs, sparsity and latency of one ONNX
    variant."""
    sess = session(path, threads)
    out = {split: data.score(run_logits(sess, f), split) for split, f in data.feeds.items()}
    return {data.val_key: out["val"], data.test_key: out["test"],
            "file_bytes": path.stat().st_size, "gzip_bytes": len(gzip.compress(path.read_bytes(), mtime=0)),
            "parameters": sum(p.numel() for p in model.parameters()),
            "macs_per_sample": prune.macs(model, data.example) // len(data.example["label"]),
            "sparsity": round(prune.sparsity(model), 4),
            "latency_ms": {f"batch_{size}": _latency(sess, _batch(data.feeds["val"], size), runs) for size in (1, 32)}}


def compress(params, features_root: Path, model_dir: Path, out_dir: Path,
             log: Callable[[str, dict], None] = lambda name, row: None, progress=print) -> dict[str, Any]:
    """Write the variants (``<name>.onnx``) and the chosen one (``model.onnx``) to ``out_dir``; return metrics.

    Steps: fp32 export -> pruning + fine-tuning (optional; kept as int8's base when within budget) ->
    int8 within the accuracy budget (optional) -> choice among the variants that fit -> headline figures.
    """
    torch.manual_seed(params.seed)
    if params.threads:
        torch.set_num_threads(params.threads)
    model = load_model(model_dir)
    data = CompressInputs(features_root, model, params.seed, params.quantize.calibration_samples)
    variants = Variants(model, data, params, progress)

    export_onnx(model, data.feeds["val"], out_dir / "fp32.onnx")
    variants.add("fp32", model, out_dir / "fp32.onnx")
    base = "fp32"
    if params.prune.method != "none":
        variants.models["pruned"] = pruned_model(model, params, features_root, data.example, log)
        export_onnx(variants.models["pruned"], data.feeds["val"], out_dir / "pruned.onnx")
        variants.add("pruned", variants.models["pruned"], out_dir / "pruned.onnx")
        if variants.fits("pruned"):
            base = "pruned"
    if params.quantize.enabled:
        quantized(base, variants, out_dir, params, log, progress)
    if params.quantize.dynamic:
        dynamic_quantized(base, variants, out_dir, progress)

    chosen = choose(variants, params.prefer)
    shutil.copyfile(out_dir / f"{chosen}.onnx", out_dir / CHOSEN_FILE)
    return {"shipped": shipped_figures(variants.rows["fp32"], variants.rows[chosen], chosen, data.headline),
            "headline": data.headline, "variants": variants.rows,
            "chosen": chosen, "prefer": params.prefer, "base_for_int8": base,
            "pytorch_fp32_latency_ms": eager_latency(model, data.example, params.latency_runs),
            "threads": params.threads, "max_accuracy_drop": params.max_accuracy_drop,
            **({"failed_variants": variants.failed} if variants.failed else {})}


def pruned_model(model: torch.nn.Module, params, features_root: Path, example: dict,
                 log: Callable[[str, dict], None]) -> torch.nn.Module:
    """The model pruned by ``prune.method`` and fine-tuned (the train loop, from the pruned weights)."""
    if params.prune.method == "structured":
        pruned = prune.structured(model, params.prune.amount, example)
    else:
        pruned = prune.unstructured(model, params.prune.amount)
    if params.prune.finetune_epochs:
        tuning = TrainParams(seed=params.seed, device="cpu", epochs=params.prune.finetune_epochs,
                             batch_size=params.prune.finetune_batch_size, lr=params.prune.finetune_lr,
                             warmup_epochs=0.0, patience=params.prune.finetune_epochs, threads=params.threads)
        pruned = train(tuning, ModelParams(**model.config["model"]), features_root, model.modalities, None, None,
                       on_epoch=lambda epoch, row: log("finetune", row), init_model=pruned)["model"]
        if params.prune.method == "unstructured":  # fine-tuning regrows pruned weights: prune again
            pruned = prune.unstructured(pruned, params.prune.amount)
    return pruned


def quantized(base: str, variants: Variants, out_dir: Path, params, log, progress) -> None:
    """Add the int8 variant of ``base`` when one fits the accuracy budget.

    ``quantize.layers: not_slower`` first probes each layer's int8 latency alone and keeps the slower ones
    in fp32; then nodes are excluded from int8 (most damaging first) until the budget holds.
    """
    data = variants.data
    prepared = out_dir / ".prepared.onnx"
    quantize.prepare(out_dir / f"{base}.onnx", prepared)
    logits_of = lambda path: run_logits(session(path), data.feeds["val"])  # noqa: E731
    accuracy_of = lambda path: data.score(logits_of(path), "val")  # noqa: E731
    candidates, slower, gains = None, [], []
    if params.quantize.layers == "not_slower":
        batch_32 = _batch(data.feeds["val"], 32)
        time_of = lambda path: _latency(session(path, params.threads), batch_32, params.latency_runs)["p50"]  # noqa: E731
        gains = quantize.latency_gains(prepared, data.calibration, params.quantize.calibration, time_of)
        for step, (node, saved) in enumerate(gains):
            log("int8_latency_probe", {"saved_share": saved, "step": step})
            progress(f"compress[int8 probe]: {node} alone saves {saved:+.1%} of the batch-32 time")
        candidates = [node for node, saved in gains if saved >= -MAX_INT8_SLOWDOWN]
        slower = [node for node, saved in gains if saved < -MAX_INT8_SLOWDOWN]
    reference = variants.rows["fp32"][data.val_key]
    trial = quantize.quantize_within_budget(
        prepared, out_dir / "int8.onnx", data.calibration, params.quantize.calibration, accuracy_of, logits_of,
        reference, params.max_accuracy_drop, lambda row: log("int8_trial", row), candidates)
    prepared.unlink()
    if trial is not None:
        variants.add("int8", variants.models[base], out_dir / "int8.onnx")
        variants.rows["int8"] |= {"from": base, "layers": params.quantize.layers,
                                  "fp32_nodes": trial["excluded"], "fp32_nodes_slower_in_int8": slower,
                                  "time_saved_alone": dict(gains)}


def dynamic_quantized(base: str, variants: Variants, out_dir: Path, progress) -> None:
    """Add the dynamic int8 variant of ``base`` (quantize.dynamic); like every variant it is shipped only
    within the accuracy budget. A graph ONNX Runtime cannot run is reported and left out, not fatal."""
    prepared, path = out_dir / ".prepared_dynamic.onnx", out_dir / "int8_dynamic.onnx"
    quantize.prepare(out_dir / f"{base}.onnx", prepared)
    quantize.quantize_dynamic_int8(prepared, path)
    prepared.unlink()
    try:
        variants.add("int8_dynamic", variants.models[base], path)
    except Exception as exc:  # noqa: BLE001 - an int8 kernel ONNX Runtime refuses at run time: this variant fails
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        progress(f"compress[int8_dynamic]: left out, ONNX Runtime cannot run it ({reason})")
        variants.failed["int8_dynamic"] = reason
        path.unlink()
        return
    variants.rows["int8_dynamic"] |= {"from": base}


def choose(variants: Variants, prefer: str) -> str:
    """Among the variants within the accuracy budget: the smallest file, or the fastest at batch 32."""
    eligible = [name for name in variants.rows if variants.fits(name)]
    if prefer == "size":
        return min(eligible, key=lambda name: variants.rows[name]["file_bytes"])
    return min(eligible, key=lambda name: variants.rows[name]["latency_ms"]["batch_32"]["p50"])


def eager_latency(model: torch.nn.Module, example: dict, runs: int) -> dict:
    """PyTorch eager fp32 latency: the reference a user would otherwise ship."""
    eager = model.eval()
    with torch.no_grad():
        return {f"batch_{b}": latency_ms(lambda b=b: eager({k: v[:b] for k, v in example.items()}), runs)
                for b in (1, 32) if b <= len(example["label"])}


def shipped_figures(fp32: dict, shipped: dict, chosen: str, headline: str = "accuracy") -> dict:
    """The shipped variant's figures, and how much smaller and faster it is than fp32 ONNX."""
    return {"variant": chosen, "file_bytes": shipped["file_bytes"], "gzip_bytes": shipped["gzip_bytes"],
            f"val_{headline}": shipped[f"val_{headline}"], f"test_{headline}": shipped[f"test_{headline}"],
            "batch_1_p50_ms": shipped["latency_ms"]["batch_1"]["p50"],
            "batch_32_p50_ms": shipped["latency_ms"]["batch_32"]["p50"],
            "smaller_than_fp32_onnx": round(fp32["file_bytes"] / shipped["file_bytes"], 2),
            "faster_than_fp32_onnx_batch_32": round(fp32["latency_ms"]["batch_32"]["p50"]
                                                    / shipped["latency_ms"]["batch_32"]["p50"], 2)}
