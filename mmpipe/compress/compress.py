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
from mmpipe.errors import PipelineError
from mmpipe.evaluate.evaluate import SplitInputs, robustness, subset_outputs
from mmpipe.features.loader import FeatureSet
from mmpipe.params import ModelParams, TrainParams
from mmpipe.timing import latency_ms
from mmpipe.training.distill import Teacher, student_config
from mmpipe.training.model_io import build_model, load_model, only_available, to_model_inputs
from mmpipe.training.train import train
from mmpipe.trust import calibration

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
             log: Callable[[str, dict], None] = lambda name, row: None, progress=print,
             clean_dir: Path | None = None) -> dict[str, Any]:
    """Write the variants (``<name>.onnx``) and the chosen one (``model.onnx``) to ``out_dir``; return metrics.

    Steps: fp32 export -> pruning + fine-tuning (optional; kept as int8's base when within budget) ->
    int8 within the accuracy budget (optional) -> distilled student and its int8 form (optional) -> choice
    among the variants that fit -> headline figures. ``clean_dir``: the clean data (the student's robustness
    sweep recomputes corrupted features from it; needed with ``distill.enabled``).
    """
    if params.distill.enabled and clean_dir is None:
        raise PipelineError("compress.distill needs the clean data (its robustness sweep): pass clean_dir")
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
    distilled = None
    if params.distill.enabled:
        distilled = distilled_student(model, variants, features_root, clean_dir, out_dir, params, log, progress)

    chosen = choose(variants, params.prefer)
    shutil.copyfile(out_dir / f"{chosen}.onnx", out_dir / CHOSEN_FILE)
    return {"shipped": shipped_figures(variants.rows["fp32"], variants.rows[chosen], chosen, data.headline),
            "headline": data.headline, "variants": variants.rows,
            "chosen": chosen, "prefer": params.prefer, "base_for_int8": base,
            "pytorch_fp32_latency_ms": eager_latency(model, data.example, params.latency_runs),
            "threads": params.threads, "max_accuracy_drop": params.max_accuracy_drop,
            **({"distill": distilled} if distilled else {}),
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


def quantized(base: str, variants: Variants, out_dir: Path, params, log, progress, name: str = "int8") -> None:
    """Add the int8 variant of ``base`` (named ``name``) when one fits the accuracy budget.

    ``quantize.layers: not_slower`` first probes each layer's int8 latency alone and keeps the slower ones
    in fp32; then nodes are excluded from int8 (most damaging first) until the budget holds.
    """
    data = variants.data
    prepared = out_dir / f".prepared_{name}.onnx"
    quantize.prepare(out_dir / f"{base}.onnx", prepared)
    logits_of = lambda path: run_logits(session(path), data.feeds["val"])  # noqa: E731
    accuracy_of = lambda path: data.score(logits_of(path), "val")  # noqa: E731
    candidates, slower, gains = None, [], []
    if params.quantize.layers == "not_slower":
        batch_32 = _batch(data.feeds["val"], 32)
        time_of = lambda path: _latency(session(path, params.threads), batch_32, params.latency_runs)["p50"]  # noqa: E731
        gains = quantize.latency_gains(prepared, data.calibration, params.quantize.calibration, time_of)
        for step, (node, saved) in enumerate(gains):
            log(f"{name}_latency_probe", {"saved_share": saved, "step": step})
            progress(f"compress[{name} probe]: {node} alone saves {saved:+.1%} of the batch-32 time")
        candidates = [node for node, saved in gains if saved >= -MAX_INT8_SLOWDOWN]
        slower = [node for node, saved in gains if saved < -MAX_INT8_SLOWDOWN]
    reference = variants.rows["fp32"][data.val_key]
    trial = quantize.quantize_within_budget(
        prepared, out_dir / f"{name}.onnx", data.calibration, params.quantize.calibration, accuracy_of, logits_of,
        reference, params.max_accuracy_drop, lambda row: log(f"{name}_trial", row), candidates)
    prepared.unlink()
    if trial is not None:
        variants.add(name, variants.models[base], out_dir / f"{name}.onnx")
        variants.rows[name] |= {"from": base, "layers": params.quantize.layers,
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


def distilled_student(teacher: torch.nn.Module, variants: Variants, features_root: Path, clean_dir: Path,
                      out_dir: Path, params, log, progress) -> dict[str, Any]:
    """Add the ``student`` variant (a smaller model trained on the teacher's outputs under every availability
    pattern: mmpipe.training.distill) and its int8 form (``student_int8``), each judged by the same accuracy
    budget; return the distillation's figures: the student's share of the teacher's MACs, its accuracy
    retention on the test split for every modality subset (PyTorch student, int8 student in ONNX Runtime) and
    both models' robustness AUCs under evaluate's corruptions at ``distill.robustness_levels``."""
    cfg, data = params.distill, variants.data
    scale, config, student, share = student_within_share(teacher, data.example, cfg)
    encoders = ", ".join(f"{m} x{v}" for m, v in scale.items()  # a pruned student: the ones at their own share
                         if m != "all" and (cfg.init == "scratch" or v != scale["all"]))
    widths = (f"the teacher's channels x{scale['all']} kept (structured pruning{'; ' + encoders if encoders else ''})"
              if cfg.init == "pruned" else f"widths x{scale['all']} (encoders: {encoders})")
    progress(f"compress[student]: {widths}, {share:.1%} of the teacher's MACs, distilling at temperature "
             f"{cfg.temperature}")
    # attention transfer pairs the student's layers with the teacher's own: a pruned student's. A fresh one's
    # random maps made it dominate the loss (the tiny test's student fell out of a 20-point budget)
    map_weight = cfg.map_weight if cfg.init == "pruned" else 0.0
    tuning = TrainParams(seed=params.seed, device="auto", epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         patience=cfg.patience, modality_dropout=cfg.modality_dropout, threads=params.threads)
    result = train(tuning, ModelParams(**config["model"]), features_root, teacher.modalities, None, None,
                   on_epoch=lambda epoch, row: log("distill", row), init_model=student,
                   teacher=Teacher(teacher, cfg.temperature, cfg.alpha, cfg.feature_weight,
                                   augmented=cfg.teacher_views == "augmented", map_weight=map_weight,
                                   alone_weight=cfg.alone_weight, select_by=cfg.select_by))
    teacher.cpu()
    student = variants.models["student"] = result["model"]
    export_onnx(student, data.feeds["val"], out_dir / "student.onnx")
    variants.add("student", student, out_dir / "student.onnx")
    if params.quantize.enabled:
        quantized("student", variants, out_dir, params, log, progress, name="student_int8")
    test = FeatureSet(features_root, split="test")
    tensors = test.get(np.arange(len(test)))
    return {"init": cfg.init, "width_scale": scale, "temperature": cfg.temperature, "alpha": cfg.alpha,
            "feature_weight": cfg.feature_weight, "teacher_views": cfg.teacher_views, "map_weight": map_weight,
            **({"model": config["model"]} if cfg.init == "scratch" else {}), "macs_share": round(share, 4),
            "epochs_run": result["metrics"]["epochs_run"], "best_epoch": result["metrics"]["best_epoch"],
            "seconds": result["metrics"]["seconds"],
            "retention": subset_retention(teacher, student, out_dir / "student_int8.onnx", tensors, test.labels),
            "robustness": robustness_of(teacher, student, features_root, clean_dir, cfg.robustness_levels, params.seed)}


def student_within_share(teacher: torch.nn.Module, example: dict, cfg) -> tuple[dict, dict, torch.nn.Module, float]:
    """({"all": width scale, modality: its encoder's scale}, config, student before distillation, MACs share) of
    the student, at ``distill.width_scale`` or with ``auto`` the widest of 0.5, 0.45, ... 0.2 within
    ``max_macs_share`` of the teacher's MACs per sample (layers fed by the fixed-size inputs shrink linearly, not
    quadratically, so half the widths is not always a quarter).

    ``init: pruned``: the teacher with that share of each prunable layer's channels kept (structured pruning,
    the largest-magnitude channels: ``prune.structured``), so the student starts from what the teacher learnt
    and distillation only has to recover what the removed channels carried (the prune-then-distill recipe of
    Minitron; on the built-in corpus a pruned start keeps the accuracy a fresh student at the same MACs loses).
    ``init: scratch``: a fresh model of the teacher's config with the widths scaled (small_cnn encoders only),
    then each encoder in turn widened back (x1, x0.75) where the budget still allows: the image encoder holds
    most MACs, while the text or tabular one costs little at full width. ``distill.encoder_width_scale`` fixes
    a modality's encoder at its own scale (either init; never widened back), the others searched as above; with
    init pruned a key may name one layer of an encoder (``image.features.3``: prune.own_keeps)."""
    per_sample = lambda m: prune.macs(m, example) / len(example["label"])  # noqa: E731
    teacher_macs = per_sample(teacher)
    scales = [cfg.width_scale] if cfg.width_scale != "auto" else [0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2]
    own = {m: v for m, v in cfg.encoder_width_scale.items() if m.partition(".")[0] in teacher.modalities}

    def fit(scale: float, encoder_scales: dict[str, float]):
        if cfg.init == "pruned":
            student = prune.structured(teacher, round(1.0 - scale, 4), example,
                                       {m: round(1.0 - v, 4) for m, v in encoder_scales.items()})
            return teacher.config, student, per_sample(student) / teacher_macs
        config = student_config(teacher.config, scale, encoder_scales)
        student = build_model(config)
        student.target = teacher.target  # judged like the teacher (a tag set: at the teacher's thresholds)
        return config, student, per_sample(student) / teacher_macs

    for scale in scales:
        config, student, share = fit(scale, own)
        if share <= cfg.max_macs_share:
            break
    else:
        encoders = f" (encoder_width_scale {own})" if own else ""
        raise PipelineError(f"compress.distill: a student at width_scale {scale}{encoders} has {share:.0%} of the "
                            f"teacher's MACs, above max_macs_share {cfg.max_macs_share}: lower width_scale or "
                            f"encoder_width_scale, or raise max_macs_share")
    chosen = {m: scale for m in teacher.modalities} | own
    if cfg.width_scale == "auto" and cfg.init == "scratch":
        for m in teacher.modalities:
            for wider in (1.0, 0.75):
                if m in own or wider <= scale:
                    break
                tried = fit(scale, chosen | {m: wider})
                if tried[2] <= cfg.max_macs_share:
                    (config, student, share), chosen[m] = tried, wider
                    break
    return {"all": scale} | chosen, config, student, share


def subset_retention(teacher: torch.nn.Module, student: torch.nn.Module, student_int8: Path, tensors: dict,
                     labels: np.ndarray) -> dict[str, dict]:
    """Per non-empty subset of the modalities ("image+audio"): the test headline metric of the teacher, the
    student and (when it was written) the int8 student with only that subset available, and the differences."""
    cpu = torch.device("cpu")
    outputs = {"teacher": subset_outputs(teacher, tensors, cpu), "student": subset_outputs(student, tensors, cpu)}
    sess = session(student_int8) if student_int8.exists() else None
    target, rows = teacher.target, {}
    for subset in calibration.subsets(teacher.modalities):
        row = {who: target.headline(target.scores(torch.from_numpy(out[subset])).numpy(), labels)
               for who, out in outputs.items()}
        if sess is not None:
            feeds = onnx_feeds(only_available(tensors, teacher.modalities, subset), teacher)
            row["student_int8"] = target.headline(target.scores(torch.from_numpy(run_logits(sess, feeds))).numpy(),
                                                  labels)
        rows["+".join(subset)] = row | {f"{who}_minus_teacher": round(row[who] - row["teacher"], 4)
                                        for who in ("student", "student_int8") if who in row}
    return rows


def robustness_of(teacher: torch.nn.Module, student: torch.nn.Module, features_root: Path, clean_dir: Path,
                  levels: list[float], seed: int) -> dict[str, dict]:
    """Relative robustness (area under headline vs corruption level, evaluate's corruptions) of teacher and
    student, per modality. evaluate's sweep puts the same corrupted inputs to the fused model and a modality's
    baseline: here the student stands in every modality's baseline place."""
    data = SplitInputs(features_root, clean_dir, "test")
    metrics, _ = robustness(teacher, {m: student for m in teacher.modalities}, data, torch.device("cpu"), levels,
                            seed, progress=lambda line: None)
    return {m: {"teacher": round(r["relative"], 4), "student": round(r["baseline_relative"], 4)}
            for m, r in metrics.items()}


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
