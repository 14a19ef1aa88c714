"""What the bounded decoders and the streamed predictor cost and save, next to the naive paths they
replaced, side by side in one run (absolute times hold for this machine only; ratios are the point):

1. a real-rate recording (10 s, 48 kHz stereo FLAC) to the model's 16 kHz mono samples:
   ``portable.decode_audio`` (header checks, block decode, soxr) vs a whole-file ``sf.read`` and the
   FFT resampler the predictor used to have;
2. an 8-channel 96 kHz FLAC of 143 s (112 KB on disk): both paths, time and traced peak memory;
3. the bundle's predictor on 20,000 text-only rows: ``predict_rows`` (a batch at a time) vs features
   for every row first and one ONNX call (what the pyfunc did), traced peak memory and time.

    python -m bench.hostile_inputs --bundle artifacts/deploy
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np
import soundfile as sf

from mmpipe import params
from mmpipe.modalities import audio
from mmpipe.deploy.export import load_predictor
from mmpipe.modalities import portable
from mmpipe.modalities.portable import RejectedInput


def fft_resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """The predictor's former resampler: zero-padding/truncating the spectrum (numpy only)."""
    n_out = int(round(len(samples) * target_rate / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), n_out // 2 + 1)
    resized = np.zeros(n_out // 2 + 1, np.complex128)
    resized[:keep] = spectrum[:keep]
    return (np.fft.irfft(resized, n_out) * (n_out / len(samples))).astype(np.float32)


def naive_audio(data: bytes, target_rate: int) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return fft_resample(samples.mean(axis=1), rate, target_rate)


def measured(call, repeats: int = 1) -> dict:
    """Median seconds over ``repeats`` and the traced peak memory (numpy buffers included) of one call."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": float(np.median(times)), "peak_mb": round(peak / 2**20, 1)}


def flac(seconds: float, rate: int, channels: int, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 440 * t)
    out = io.BytesIO()
    sf.write(out, np.stack([wave] * channels, axis=1).astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="artifacts/deploy", help="a deployment bundle (export stage output)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--out", default="reports/bench_hostile.json")
    args = parser.parse_args()
    rules = audio.Clean().model_dump()
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}"}

    recording = flac(10.0, 48000, 2)
    ours = measured(lambda: portable.decode_audio(recording, rules), repeats=5)
    naive = measured(lambda: naive_audio(recording, rules["sample_rate"]), repeats=5)
    report["recording_10s_48k_stereo"] = {"decode_audio": ours, "naive": naive,
                                          "speedup": round(naive["seconds"] / ours["seconds"], 2),
                                          "memory_ratio": round(naive["peak_mb"] / max(ours["peak_mb"], 0.1), 1)}

    bomb = flac(143.0, 96000, 8, silent=True)

    def bounded() -> None:
        try:
            portable.decode_audio(bomb, rules)
        except RejectedInput:
            pass
    ours, naive = measured(bounded, repeats=3), measured(lambda: naive_audio(bomb, rules["sample_rate"]))
    report["flac_8ch_96k_143s"] = {"bytes": len(bomb), "decode_audio": ours, "naive": naive,
                                   "speedup": round(naive["seconds"] / ours["seconds"], 1),
                                   "memory_ratio": round(naive["peak_mb"] / max(ours["peak_mb"], 0.1), 1)}

    folder = Path(args.bundle)
    predictor = load_predictor(folder).Predictor(folder)
    rows = [{"text": "a"}] * args.rows

    def streamed() -> None:
        for _ in predictor.predict_rows(rows):
            pass

    def all_at_once() -> None:
        predictor.predict([predictor.features(**row) for row in rows])
    ours, naive = measured(streamed), measured(all_at_once)
    report[f"predictor_{args.rows}_text_rows"] = {"predict_rows": ours, "all_rows_at_once": naive,
                                                  "speedup": round(naive["seconds"] / ours["seconds"], 2),
                                                  "memory_ratio": round(naive["peak_mb"] / max(ours["peak_mb"], 0.1), 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
