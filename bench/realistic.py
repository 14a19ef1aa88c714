"""The whole pipeline on data shaped like a user's, measured stage by stage.

    python -m bench.realistic --samples 10000                     # realistic files, default params
    python -m bench.realistic --samples 4000 --profile builtin --set train.epochs=2

``--profile realistic`` writes N samples as a user brings them — a folder of files and a CSV manifest
(docs/data-format.md): 224x224 photos (70 % JPEG, 30 % PNG, with EXIF camera tags), 5-10 s recordings at
44.1 or 48 kHz stereo (70 % WAV, 30 % FLAC; the utterance within its first 0.3 s, then its noise floor),
1-3 sentence texts and a metadata record (JSON cell), with the built-in corpus's missing and degraded
rates (each sample is the built-in corpus's ``make_sample`` reshaped: the task stays learnable). ``--profile builtin``
is the built-in corpus at N samples.

Then ``dvc repro`` (up to ``--until``) runs in a temporary copy of the repository with its own MLflow
store, and each stage's figures are read from its metrics file's ``process`` block (mmpipe.resources:
wall time from process start, peak RSS, peak GPU memory, bytes written): a table and a JSON in ``--out``.
Absolute figures hold for the machine they were taken on only (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FILLER = ["The form came in with the morning post.", "Scanned at the regional office.",
          "Ink is a little faded on the left.", "Second copy, the first one was torn.",
          "Filed under batch seven.", "Checked twice by the night shift."]
EXIF_MAKE, EXIF_MODEL, EXIF_DATETIME, EXIF_ORIENTATION = 0x010F, 0x0110, 0x0132, 0x0112


def realistic_sample(index: int, seed: int, folder: Path, configs: dict, banks: dict) -> dict:
    """Sample ``index``: the built-in corpus's sample (``make_sample``: label, group, missing/degraded
    draws, content) at a 44.1 or 48 kHz rate, reshaped as a user's files under ``folder``; its manifest row
    returned. ``configs``/``banks``: the corpus settings and speech bank per rate."""
    from mmpipe.data import builtin

    rng = np.random.default_rng([seed, index, 5])  # a stream make_sample does not use
    rate = (44100, 48000)[int(rng.integers(2))]
    sample = builtin.make_sample(index, seed, configs[rate], banks[rate])
    row = {"id": f"r-{index:07d}", "label": sample.label, "group": sample.group}
    if sample.image is not None:
        photo = Image.open(io.BytesIO(sample.image))
        exif = Image.Exif()
        exif.update({EXIF_MAKE: "Acme", EXIF_MODEL: f"Phone {int(rng.integers(3, 9))}",
                     EXIF_DATETIME: f"2026:0{int(rng.integers(1, 10))}:1{int(rng.integers(0, 9))} 10:00:00",
                     EXIF_ORIENTATION: 1})
        jpeg = photo.format == "JPEG"
        row["image"] = f"{row['id']}.{'jpg' if jpeg else 'png'}"
        photo.save(folder / row["image"], format=photo.format, exif=exif,
                   **({"quality": int(rng.integers(80, 95))} if jpeg else {"compress_level": 1}))
    if sample.audio is not None:  # the utterance in the first 0.3 s, then the clip's own noise floor, in stereo
        mono, _ = sf.read(io.BytesIO(sample.audio), dtype="float32")
        total = int(rng.uniform(5.0, 10.0) * rate)
        start = int(rng.uniform(0.0, 0.3) * rate)
        mono = mono[:total - start]
        noise_level = float(np.std(mono[: int(0.05 * rate)])) + 1e-3
        signal = rng.normal(0.0, noise_level, (total, 2)).astype(np.float32)
        delay = int(rng.integers(0, 40))  # the second microphone hears it a little later and softer
        signal[start:start + len(mono), 0] += mono
        signal[start + delay:start + delay + len(mono), 1] += 0.8 * mono[:total - start - delay]
        flac = rng.random() < 0.3
        row["audio"] = f"{row['id']}.{'flac' if flac else 'wav'}"
        sf.write(folder / row["audio"], np.clip(signal, -1.0, 1.0), rate, format="FLAC" if flac else "WAV",
                 subtype="PCM_16")
    if sample.text is not None:
        sentences = [sample.text.decode().rstrip(".!?") + ".",
                     *(FILLER[int(k)] for k in rng.choice(len(FILLER), int(rng.integers(0, 3)), replace=False))]
        rng.shuffle(sentences)
        row["text"] = " ".join(sentences)
    if sample.tabular is not None:
        row["tabular"] = sample.tabular.decode()
    return row


def _make_rows(indices: list[int], seed: int, folder: str) -> list[dict]:
    from mmpipe.data import builtin

    configs = {rate: builtin.BuiltinCorpus(image_size=224, audio_sample_rate=rate, p_jpeg=0.7, p_flac=0.0, tabular=True)
               for rate in (44100, 48000)}
    banks = {rate: builtin.speech_bank(seed, 16, rate) for rate in configs}
    return [realistic_sample(i, seed, Path(folder), configs, banks) for i in indices]


def write_realistic(n: int, folder: Path, seed: int = 0, workers: int | None = None) -> Path:
    """N samples as files + ``manifest.csv`` in ``folder``; returns the manifest's path."""
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    chunks = [list(range(i, min(i + 250, n))) for i in range(0, n, 250)]
    with cf.ProcessPoolExecutor(workers) as pool:
        rows = [row for part in pool.map(_make_rows, chunks, [seed] * len(chunks), [str(folder)] * len(chunks))
                for row in part]
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows, columns=["id", "label", "group", "image", "audio", "text", "tabular"]).to_csv(manifest, index=False)
    return manifest


def copy_repo(dest: Path) -> Path:
    """The git-tracked files of this checkout, as they are on disk (one a running stage has just removed
    is left out), committed in a fresh repository at ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for stale in (dest / "metrics").glob("*.json"):  # this repository's figures, not the run's
        stale.unlink()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def dvc_command() -> str:
    """dvc beside this Python (a virtual environment), else on PATH (a wheelhouse installed with --target)."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.exists() else (shutil.which("dvc") or str(beside))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def set_param(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = params
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def folder_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1) if path.exists() else 0.0


def stage_figures(work: Path, samples: int) -> dict[str, dict]:
    """Per stage, from its metrics file: the ``process`` block and samples/s over the stage's wall time."""
    from mmpipe import layout
    from mmpipe.modalities import names

    files = {stage: layout.METRICS[stage] for stage in ("collect", "clean")}
    files |= {f"preprocess@{m}": layout.preprocess_metrics(m) for m in names()}
    files |= {stage: layout.METRICS[stage] for stage in ("train", "evaluate", "compress", "export")}
    out = {}
    for stage, relative in files.items():
        path = work / relative
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())
        if stage.startswith("preprocess") and not metrics.get("enabled", True):
            continue
        figures = dict(metrics.get("process", {}))
        figures["samples_per_s"] = round(samples / figures["wall_s"], 1) if figures.get("wall_s") else None
        if stage == "train":
            figures["train_samples_per_s"] = {k: v["samples_per_s"] for k, v in metrics.items()
                                              if isinstance(v, dict) and "samples_per_s" in v}
            figures["data"] = metrics["fusion"].get("data")
        out[stage] = figures
    return out


def run(samples: int, profile: str, overrides: list[str], until: str, keep: bool = False, seed: int = 0) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mmpipe-{profile}-{samples}-"))
    try:
        repo = copy_repo(work / "repo")
        params = yaml.safe_load((repo / "params.yaml").read_text())
        generated = None
        if profile == "realistic":
            tic = time.perf_counter()
            manifest = write_realistic(samples, work / "userdata", seed)
            generated = {"seconds": round(time.perf_counter() - tic, 1), "mb": folder_mb(work / "userdata")}
            set_param(params, "data.source", str(manifest))
        else:
            set_param(params, "data.n_samples", samples)
        for item in overrides:
            key, value = item.split("=", 1)
            set_param(params, key, yaml.safe_load(value))
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        tic = time.perf_counter()
        proc = subprocess.run([dvc_command(), "repro", until], cwd=repo, env=env,
                              capture_output=True, text=True)
        wall = round(time.perf_counter() - tic, 1)
        (work / "repro.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"dvc repro failed (log: {work / 'repro.log'}):\n{proc.stderr[-3000:]}")
        return {"profile": profile, "samples": samples, "overrides": overrides, "until": until, "machine": machine(),
                "date": time.strftime("%Y-%m-%d"), "generated": generated, "dvc_repro_wall_s": wall,
                "stages": stage_figures(repo, samples),
                "data_mb": {p: folder_mb(repo / "data" / p) for p in ("raw", "clean", "features")},
                "dvc_cache_mb": folder_mb(repo / ".dvc" / "cache"), "test": test_figures(repo)} \
            | ({"work": str(work)} if keep else {})
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def test_figures(repo: Path) -> dict:
    """The test split's headline figures of the run (metrics/eval.json; {} when it stopped before evaluate)."""
    path = repo / "metrics" / "eval.json"
    if not path.is_file():
        return {}
    metrics = json.loads(path.read_text())
    h = metrics.get("target", {}).get("headline", "accuracy")
    return {h: metrics["test"][h], "fusion_gain": metrics.get("fusion_gain"),
            "robustness": {m: r["relative"] for m, r in metrics.get("robustness", {}).items()}}


def table(result: dict) -> str:
    lines = ["| stage | wall s | samples/s | peak RSS MB | peak GPU MB | written MB |", "|---|---|---|---|---|---|"]
    for stage, f in result["stages"].items():
        lines.append(f"| {stage} | {f.get('wall_s', '')} | {f.get('samples_per_s') or ''} | {f.get('peak_rss_mb', '')} "
                     f"| {f.get('peak_gpu_memory_mb', '—')} | {f.get('written_mb', '')} |")
    lines.append(f"| **dvc repro (wall)** | **{result['dvc_repro_wall_s']}** | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--profile", choices=["realistic", "builtin"], default="realistic")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override")
    parser.add_argument("--until", default="export", help="the last stage dvc repro runs")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench_realistic")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args()
    result = run(args.samples, args.profile, args.set, args.until, args.keep)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.profile}-{args.samples}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
