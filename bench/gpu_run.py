"""The GPU figures in one prepared command: everything a short loan of a GPU machine should measure.

    bash bench/gpu_run.sh OUT                       # on the GPU machine: the wheelhouse, then the command below
    python -m bench.gpu_run --out OUT [--budget-s 540]
    python -m bench.gpu_run --out OUT --dry-run     # tiny sizes on CPU, every part exercised (the test suite's)

A GPU machine is lent for about 15 minutes, start-up included, so this runs its parts one after another
within ``--budget-s`` (9 minutes), each in its own process with a hard time box (its share of the budget plus
whatever the parts before it left unused; a part that overruns is killed and recorded as skipped, with why),
printing as it goes and writing ``OUT/gpu_run.json`` and ``OUT/gpu_run.md`` after every part (a run cut short
still leaves its figures):

1. environment: GPU, driver, torch / CUDA / cuDNN / ONNX Runtime versions and providers, CPU cores;
2. default_repro: the default ``dvc repro`` from scratch in a temporary copy (bench.realistic, built-in
   corpus): per-stage wall time, peak RSS and GPU memory (goal: <= 120 s in all);
3. train_throughput: training samples/s of the fusion model at batch 128 and 1024, eager, CUDA graphs
   (``train.cuda_graphs``) and ``torch.compile``; each single-modality baseline eager at 1024; and the
   large-batch recipe (batch 1024, sqrt-scaled lr, 3 warm-up epochs, params.yaml's epochs) with its
   validation accuracy next to its speed;
4. evaluate_sweeps: evaluate's corruption sweep (every modality, corruption and level) on CUDA vs CPU;
5. onnx_latency: ONNX Runtime p50 of the bundle's shipped, fp32 and fp16 models (each one's largest
   difference from fp32 on the CPU stated), on the CUDA execution provider (with onnxruntime-gpu) next to the CPU one, batch 1
   and 64;
6. realistic: ``bench.realistic`` on the realistic profile at the largest size the remaining budget allows
   (aim 10,000), with a pretrained backbone (a random-initialised resnet18 state-dict file: speed does not
   depend on the weights) behind the embedding cache.

``--dry-run`` shrinks every part (200 samples, two epochs, tiny batches, CPU): what runs only on CUDA is
recorded as skipped with its reason, so the script cannot rot between GPU loans. Times hold for the machine
they were taken on (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (part, share of the budget): unused time carries over to the next part; realistic takes what is left
PARTS = [("environment", 0.03), ("default_repro", 0.30), ("train_throughput", 0.25), ("evaluate_sweeps", 0.07),
         ("onnx_latency", 0.07), ("realistic", 0.28)]
# the tiny profile of the dry run (as the end-to-end tests'): every stage runs in about a minute on 2 cores
DRY_SETS = ["data.n_samples=200", "data.builtin.tts_variants=6", "clean.min_per_class=2", "model.dim=16",
            "model.hidden=16", "model.encoders.image.width=4", "model.encoders.text.width=8",
            "model.encoders.audio.width=4", "train.epochs=1", "train.baselines=false", "evaluate.latency_runs=5",
            "evaluate.noise_levels=[0.0, 1.0]", "evaluate.gates.min_accuracy=null", "evaluate.gates.min_coverage=null",
            "evaluate.gates.max_modality_share=null", "compress.latency_runs=5", "compress.prune.finetune_epochs=1",
            "compress.quantize.calibration_samples=64"]


def cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def environment(state: dict, dry: bool) -> dict:
    import onnxruntime as ort
    import torch
    out = {"python": platform.python_version(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(), "gpu": None, "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 2**30, 1)}
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30)
            out["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout else None
    return out


def default_repro(state: dict, dry: bool) -> dict:
    from bench import realistic
    result = realistic.run(200 if dry else 4000, "builtin", DRY_SETS if dry else [], "export", keep=True)
    state["repo"] = result.pop("work") + "/repo"
    per_sample = result["dvc_repro_wall_s"] / result["samples"]
    state["repro_s_per_sample"] = per_sample
    return {"samples": result["samples"], "dvc_repro_wall_s": result["dvc_repro_wall_s"], "goal_s": 120,
            "stages": {stage: {k: f.get(k) for k in ("wall_s", "peak_rss_mb", "peak_gpu_memory_mb")}
                       for stage, f in result["stages"].items()},
            "test": result["test"], "machine": result["machine"]}


def train_throughput(state: dict, dry: bool) -> dict:
    import torch
    from mmpipe import params
    from mmpipe.features.loader import feature_modalities
    from mmpipe.training.train import train
    repo = Path(state["repo"])
    features = repo / "data" / "features"
    base = params.load("train", repo / "params.yaml")
    model_cfg = params.load("model", repo / "params.yaml")
    modalities = list(feature_modalities(features))
    on_gpu = cuda()
    batches, epochs = ((16, 64) if dry else (128, 1024)), (2 if dry else 4)
    modes = {"eager": {"cuda_graphs": False}, "cuda_graphs": {"cuda_graphs": True}, "compile": {"compile": True,
                                                                                                 "cuda_graphs": False}}
    out, skipped = {}, {}

    def measure(name: str, models: list[str], update: dict) -> dict:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        cfg = base.model_copy(update={"device": "cuda" if on_gpu else "cpu", "patience": 10_000} | update)
        tic = time.perf_counter()
        result = train(cfg, model_cfg, features, models, None, None)
        history = result["history"]
        # the last epoch's rate: the first one carries graph recording / compilation
        figures = {"samples_per_s_last_epoch": round(history[-1]["samples_per_s"], 1),
                   "samples_per_s_run": result["metrics"]["samples_per_s"], "epochs": len(history),
                   "seconds": round(time.perf_counter() - tic, 1), "val_headline": round(max(
                       r[f"val_{result['metrics']['headline']}"] for r in history), 4),
                   "cuda_graphs": result["metrics"].get("cuda_graphs", False),
                   "peak_gpu_memory_mb": result["metrics"].get("peak_gpu_memory_mb")}
        print(f"  {name}: {figures['samples_per_s_last_epoch']:.0f} samples/s (last epoch), val "
              f"{figures['val_headline']:.4f}", flush=True)
        return figures

    for batch in batches:
        for mode, update in modes.items():
            if mode != "eager" and not on_gpu:
                skipped[f"fusion@{batch}/{mode}"] = "needs CUDA"
                continue
            out[f"fusion@{batch}/{mode}"] = measure(f"fusion@{batch}/{mode}", modalities,
                                                    update | {"batch_size": batch, "epochs": epochs})
    for m in modalities:
        out[f"baseline_{m}@{batches[1]}/eager"] = measure(f"baseline_{m}@{batches[1]}/eager", [m],
                                                          {"batch_size": batches[1], "epochs": epochs,
                                                           "cuda_graphs": False})
    big = batches[1]
    recipe = {"batch_size": big, "lr": round(base.lr * (big / base.batch_size) ** 0.5, 6), "warmup_epochs": 3.0,
              "epochs": 3 if dry else base.epochs, "patience": base.patience}
    out["large_batch_recipe"] = measure("large_batch_recipe", modalities, recipe) | {"recipe": recipe}
    return {"runs": out, "skipped": skipped, "device": "cuda" if on_gpu else "cpu", "goal_samples_per_s": 20_000}


def evaluate_sweeps(state: dict, dry: bool) -> dict:
    import torch
    from mmpipe import params
    from mmpipe.evaluate.evaluate import SplitInputs, robustness
    from mmpipe.training.model_io import load_model
    repo = Path(state["repo"])
    levels = params.load("evaluate", repo / "params.yaml").noise_levels
    data = SplitInputs(repo / "data" / "features", repo / "data" / "clean", "test")
    out = {"levels": levels, "test_rows": len(data)}
    for device in (["cuda"] if cuda() else []) + ["cpu"]:
        model = load_model(repo / "models" / "fusion").to(device)
        tic = time.perf_counter()
        robustness(model, {m: model for m in model.modalities}, data, torch.device(device), levels, 0,
                   progress=lambda line: None)
        out[f"{device}_s"] = round(time.perf_counter() - tic, 2)
        print(f"  sweep on {device}: {out[f'{device}_s']} s", flush=True)
    if "cuda_s" in out:
        out["cpu_over_cuda"] = round(out["cpu_s"] / out["cuda_s"], 2)
    else:
        out["skipped"] = {"cuda": "needs CUDA"}
    return out


def onnx_latency(state: dict, dry: bool) -> dict:
    import numpy as np
    import onnxruntime as ort
    from mmpipe.compress.onnx_model import onnx_feeds
    from mmpipe.features.loader import FeatureSet
    from mmpipe.training.model_io import load_model
    repo = Path(state["repo"])
    bundle = repo / "artifacts" / "deploy"
    manifest = json.loads((bundle / "manifest.json").read_text())
    # shipped, fp32 and (when export could make one) the bundle's own fp16 model
    files = {name: bundle / spec["file"] for name, spec in manifest["models"].items()}
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if "CUDAExecutionProvider"
                                            in ort.get_available_providers() else [])
    reference = ort.InferenceSession(str(files["fp32"]), providers=["CPUExecutionProvider"])
    # real inputs: the test split's features as the bundle's model takes them (rows repeated up to 64)
    model = load_model(repo / "models" / "fusion")
    test = FeatureSet(repo / "data" / "features", split="test")
    rows = np.resize(np.arange(len(test)), 64)
    feeds = onnx_feeds(test.get(rows), model)

    def feeds_of(size: int) -> dict:
        return {k: v[:size] for k, v in feeds.items()}

    runs = 10 if dry else 200
    out, inputs = {"runs": runs, "providers": providers}, {1: feeds_of(1), 64: feeds_of(64)}
    truth = reference.run(None, inputs[64])[0]
    for provider in providers:
        for name, path in files.items():
            try:
                session = ort.InferenceSession(str(path), providers=[provider])
            except Exception as error:  # noqa: BLE001 - a variant this provider cannot run: say so
                out[f"{name}/{provider}"] = {"error": str(error).splitlines()[0][:200]}
                continue
            row = {"max_abs_diff_vs_fp32_cpu": float(np.abs(session.run(None, inputs[64])[0] - truth).max())}
            for size, feed in inputs.items():
                for _ in range(3):
                    session.run(None, feed)
                times = []
                for _ in range(runs):
                    tic = time.perf_counter()
                    session.run(None, feed)
                    times.append(time.perf_counter() - tic)
                row[f"batch_{size}_p50_ms"] = round(float(np.median(times)) * 1e3, 3)
            out[f"{name}/{provider}"] = row
            print(f"  {name} on {provider}: batch 1 {row['batch_1_p50_ms']} ms, batch 64 {row['batch_64_p50_ms']} ms",
                  flush=True)
    if len(providers) == 1:
        out["skipped"] = {"CUDAExecutionProvider": "needs onnxruntime-gpu and CUDA"}
    return out


def realistic(state: dict, dry: bool, seconds_left: float) -> dict:
    import torch
    import torchvision
    from bench import realistic as bench_realistic
    weights = Path(tempfile.mkdtemp()) / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)  # random: speed only
    # the default repro's seconds per sample, x3 for the realistic files (decoding, 224 px, resnet18 embedding)
    per_sample = 3 * state.get("repro_s_per_sample", 0.05)
    samples = 60 if dry else int(max(1000, min(10_000, 0.8 * seconds_left / per_sample)) // 500 * 500)
    sets = ["model.encoders.image.arch=resnet18", f"model.encoders.image.weights={weights}",
            "model.encoders.image.freeze=all", "preprocess.image.size=224" if not dry else "preprocess.image.size=32",
            "preprocess.image.embed=true"]
    if dry:
        sets += [s for s in DRY_SETS if not s.startswith(("data.n_samples", "data.builtin"))]
    print(f"  realistic profile at {samples} samples", flush=True)
    # (dry run: up to preprocess, the embedding cache included; train on a cache is the end-to-end tests')
    result = bench_realistic.run(samples, "realistic", sets, "preprocess" if dry else "export")
    return {"samples": samples, "overrides": sets, "dvc_repro_wall_s": result["dvc_repro_wall_s"],
            "generated": result["generated"], "stages": result["stages"], "test": result["test"]}


FUNCTIONS = {"environment": environment, "default_repro": default_repro, "train_throughput": train_throughput,
             "evaluate_sweeps": evaluate_sweeps, "onnx_latency": onnx_latency}


def run_part(name: str, state_file: Path, dry: bool, seconds_left: float) -> None:
    """In the part's own process: read the state, measure, write {"result", "state"} beside the state."""
    state = json.loads(state_file.read_text())
    result = realistic(state, dry, seconds_left) if name == "realistic" else FUNCTIONS[name](state, dry)
    (state_file.parent / f"{name}.json").write_text(json.dumps({"result": result, "state": state}, indent=2))


def markdown(report: dict) -> str:
    lines = [f"# GPU run ({report['environment'].get('gpu') or 'no GPU'}, {report['date']}"
             f"{', dry run' if report['dry_run'] else ''})", "",
             f"Budget {report['budget_s']} s, used {report['wall_s']} s.", "", "| part | status | seconds |",
             "|---|---|---|"]
    lines += [f"| {name} | {p['status']} | {p['seconds']} |" for name, p in report["parts"].items()]
    repro = report["results"].get("default_repro")
    if repro:
        lines += ["", f"Default `dvc repro`: {repro['dvc_repro_wall_s']} s (goal {repro['goal_s']} s).", "",
                  "| stage | wall s | peak RSS MB | peak GPU MB |", "|---|---|---|---|"]
        lines += [f"| {s} | {f['wall_s']} | {f['peak_rss_mb']} | {f['peak_gpu_memory_mb'] or '—'} |"
                  for s, f in repro["stages"].items()]
    tput = report["results"].get("train_throughput")
    if tput:
        lines += ["", "| training run | samples/s (last epoch) | val headline | peak GPU MB |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['samples_per_s_last_epoch']} | {r['val_headline']} | {r['peak_gpu_memory_mb'] or '—'} |"
                  for name, r in tput["runs"].items()]
    latency = report["results"].get("onnx_latency")
    if latency:
        lines += ["", "| ONNX model / provider | batch 1 p50 ms | batch 64 p50 ms | max abs diff vs fp32 CPU |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v.get('batch_1_p50_ms', v.get('error'))} | {v.get('batch_64_p50_ms', '')} | "
                  f"{v.get('max_abs_diff_vs_fp32_cpu', '')} |" for k, v in latency.items() if "/" in k]
    sweeps = report["results"].get("evaluate_sweeps")
    if sweeps:
        lines += ["", f"Evaluate's corruption sweep: CPU {sweeps['cpu_s']} s"
                  + (f", CUDA {sweeps['cuda_s']} s ({sweeps['cpu_over_cuda']}x)" if "cuda_s" in sweeps else "") + "."]
    real = report["results"].get("realistic")
    if real:
        lines += ["", f"Realistic profile, {real['samples']} samples, resnet18 behind the embedding cache: `dvc repro` "
                      f"{real['dvc_repro_wall_s']} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where gpu_run.json and gpu_run.md go")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run's wall-time budget")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, every part exercised")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # (internal: run one part in this process)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds-left", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        return run_part(args.part, args.state, args.dry_run, args.seconds_left)

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mmpipe-gpu-run-"))
    state_file, state = work / "state.json", {}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "budget_s": args.budget_s,
              "parts": {}, "results": {}, "environment": {}}
    carried = 0.0
    (work / "tmp").mkdir()  # the parts' temporary copies: removed with ``work``, even those of a killed part
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TMPDIR": str(work / "tmp")}
    try:
        for name, share in PARTS:
            left = args.budget_s - (time.perf_counter() - started)
            box = left if name == PARTS[-1][0] else min(left, share * args.budget_s + carried)
            if box < 5:
                report["parts"][name] = {"status": "skipped: the budget ran out before it", "seconds": 0}
                print(f"[gpu_run] {name}: skipped (budget spent)", flush=True)
                continue
            needs_repo = name not in ("environment", "default_repro", "realistic")
            if needs_repo and "repo" not in state:
                report["parts"][name] = {"status": "skipped: default_repro did not finish", "seconds": 0}
                print(f"[gpu_run] {name}: skipped (no pipeline run to measure)", flush=True)
                continue
            print(f"[gpu_run] {name} (time box {box:.0f} s)", flush=True)
            state_file.write_text(json.dumps(state))
            tic = time.perf_counter()
            cmd = [sys.executable, "-m", "bench.gpu_run", "--out", str(args.out), "--part", name, "--state",
                   str(state_file), "--seconds-left", f"{box:.0f}"] + (["--dry-run"] if args.dry_run else [])
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout=box)
                status = "done" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:  # the part and everything it started (dvc, its stages)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = f"skipped: over its time box of {box:.0f} s"
            seconds = round(time.perf_counter() - tic, 1)
            carried = max(0.0, box - seconds) if name != PARTS[-1][0] else 0.0
            if status == "done":
                written = json.loads((work / f"{name}.json").read_text())
                report["results"][name], state = written["result"], written["state"]
                if name == "environment":
                    report["environment"] = written["result"]
            report["parts"][name] = {"status": status, "seconds": seconds}
            print(f"[gpu_run] {name}: {status} in {seconds} s", flush=True)
            report["wall_s"] = round(time.perf_counter() - started, 1)
            (args.out / "gpu_run.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / "gpu_run.md").write_text(markdown(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "gpu_run.md").read_text())


if __name__ == "__main__":
    main()
