"""Preprocessing and loader benchmarks: this project's path vs a naive baseline, side by side.

    make bench                      # = python -m bench.run --samples 20000

Builds a built-in corpus of N samples (collect + clean, not timed), then on the same samples:

  preprocess_audio_speedup  stage path (batched log-mel in worker threads) vs per file
                            librosa.load + librosa.feature.melspectrogram + np.save
  preprocess_image_speedup  stage path vs per file PIL open + resize + np.save
  loader_samples_per_s      one epoch of shuffled batches of 256 from the memory-mapped shards
  loader_speedup            ... vs a per-sample Dataset decoding the raw bytes in __getitem__,
                            through torch's DataLoader (batch 256, one worker process per core)

Writes reports/bench.json (flat keys) and prints a table. Times hold for this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from bench import naive
from mmpipe import params
from mmpipe.data.clean import clean
from mmpipe.data.collect import collect
from mmpipe.features.loader import FeatureSet
from mmpipe.features.preprocess import preprocess, resolved
from mmpipe.names import SAMPLES_DIR, shard_path
from mmpipe.modalities import names
from mmpipe.modalities.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
JPEG_MAGIC = b"\xff\xd8"


def timed(fn, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def feature_rows(folder: Path, name: str, shard_rows: int, rows: list[int]) -> np.ndarray:
    return np.stack([np.load(shard_path(folder, name, r // shard_rows), mmap_mode="r")[r % shard_rows] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    args = parser.parse_args()
    results: dict[str, object] = {
        "samples": args.samples, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads()}
    work = Path(tempfile.mkdtemp(prefix="mmpipe-bench-"))
    try:
        data = params.validate("data", {**params.load("data", ROOT / "params.yaml").model_dump(), "n_samples": args.samples})
        clean_cfg = params.load("clean", ROOT / "params.yaml")
        prep = params.load("preprocess", ROOT / "params.yaml")
        for folder in ("raw", "clean", *(f"features/{m}" for m in names()), "naive/audio", "naive/image",
                       "files/audio", "files/image"):
            (work / folder).mkdir(parents=True)
        print(f"building a {args.samples}-sample corpus (not timed) in {work} ...")
        collect(data, work / "raw")
        clean(clean_cfg, work / "raw", work / "clean")
        prep = resolved(prep, work / "clean")  # sizes left to auto, as preprocess resolves them: the same for both paths
        dataset = json.loads((work / "clean" / "dataset.json").read_text())
        rows = [r for p in sorted((work / "clean" / SAMPLES_DIR).glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]

        # the naive baselines read one file per sample: write them out (not timed)
        audio_files, image_files = {}, {}
        for i, row in enumerate(rows):
            if row["audio_available"]:
                audio_files[i] = work / "files/audio" / f"{i}.wav"
                audio_files[i].write_bytes(row["audio"])
            if row["image_available"]:
                suffix = "jpg" if row["image"].startswith(JPEG_MAGIC) else "png"
                image_files[i] = work / "files/image" / f"{i}.{suffix}"
                image_files[i].write_bytes(row["image"])

        for modality, files, baseline in (
                ("audio", audio_files, lambda p, o: naive.audio_file_features(p, o, dataset["clean_rules"]["audio"]["sample_rate"], prep.audio)),
                ("image", image_files, lambda p, o: naive.image_file_features(p, o, prep.image))):
            naive_s, _ = timed(lambda: [baseline(p, work / f"naive/{modality}/{i}.npy") for i, p in files.items()])
            ours_s, metrics = timed(preprocess, modality, prep, work / "clean", work / f"features/{modality}")
            check = sorted(files)[:200]
            ours = feature_rows(work / f"features/{modality}", modality, prep.shard_rows, check).astype(np.float32)
            theirs = np.stack([np.load(work / f"naive/{modality}/{i}.npy") for i in check]).astype(np.float32)
            results.update({f"preprocess_{modality}_naive_s": round(naive_s, 2), f"preprocess_{modality}_s": round(ours_s, 2),
                            f"preprocess_{modality}_speedup": round(naive_s / ours_s, 2),
                            f"preprocess_{modality}_max_abs_diff": float(np.abs(ours - theirs).max()),
                            f"preprocess_{modality}_files": len(files)})
        text_s, _ = timed(preprocess, "text", prep, work / "clean", work / "features/text")
        results["preprocess_text_s"] = round(text_s, 2)
        for m in (m for m in names() if m not in ("audio", "image", "text")):  # the loader reads every registered
            preprocess(m, prep, work / "clean", work / f"features/{m}")        # modality (a no-op without its data)

        features = FeatureSet(work / "features", split=None)
        loader_s, seen = timed(lambda: sum(len(b["label"]) for b in features.batches(256, shuffle=True)))
        tokenizer = Tokenizer.load(work / "features/text/tokenizer.json")
        dataset_naive = naive.RawBytesDataset(rows, dataset["labels"], prep, dataset["clean_rules"]["audio"]["sample_rate"], tokenizer)
        loader = torch.utils.data.DataLoader(dataset_naive, batch_size=256, shuffle=True, num_workers=os.cpu_count())
        naive_loader_s, naive_seen = timed(lambda: sum(len(b["label"]) for b in loader))
        results.update({
            "loader_samples_per_s": round(seen / loader_s), "loader_naive_samples_per_s": round(naive_seen / naive_loader_s),
            "loader_speedup": round((seen / loader_s) / (naive_seen / naive_loader_s), 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
