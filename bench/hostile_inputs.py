"""What the bounded decoders and the streamed predictor cost and save, next to the naive paths they
replaced, side by side in one run (absolute times hold for this machine only; ratios are the point):

1. a real-rate recording (10 s, 48 kHz stereo FLAC) to the model's 16 kHz mono samples:
   ``portable.decode_audio`` (header checks, block decode, soxr) vs a whole-file ``sf.read`` and the
   FFT resampler the predictor used to have;
2. an 8-channel 96 kHz FLAC of 143 s (112 KB on disk): both paths, time and traced peak memory;
3. the bundle's predictor on 20,000 text-only rows: ``predict_rows`` (a batch at a time) vs features
   for every row first and one ONNX call (what the pyfunc did), traced peak memory and time;
4. allowed but large inputs through the predictor: a 4096x4096 PNG of ~60 KB and a 29 s 8-channel
   384 kHz FLAC of 95 KB, decoded once (and audio only as far as the model hears) vs the former
   double decode / whole-clip decode;
5. over-limit requests through MLflow's scoring code path in-process (the bundle as the pyfunc
   model): the guard (``mlflow_model.guard_scoring_server``) vs MLflow's own parsing followed by the
   former answer (the row-limit error on every row), answer bytes, memory and time, for a Parquet,
   a CSV and a JSON body.

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
from PIL import Image

from mmpipe.modalities import audio
from mmpipe.deploy.verify import load_predictor
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


def _rss(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024


def measured(call, repeats: int = 1) -> dict:
    """Median seconds over ``repeats``; the traced peak memory (Python and numpy allocations) of one
    call, and the growth of the process's resident memory during one call (peak reset through
    /proc/self/clear_refs: what Pillow and other C code allocate, which tracing does not see)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS:")
    call()
    return {"seconds": float(np.median(times)), "peak_mb": round(peak / 2**20, 1),
            "rss_growth_mb": round((_rss("VmHWM:") - before) / 2**20, 1)}


def ratios(ours: dict, naive: dict) -> dict:
    """The naive path's time and memory over ours (memory: traced allocations, and resident growth)."""
    return {"speedup": round(naive["seconds"] / ours["seconds"], 2),
            "memory_ratio": round(naive["peak_mb"] / max(ours["peak_mb"], 0.1), 1),
            "rss_ratio": round(naive["rss_growth_mb"] / max(ours["rss_growth_mb"], 0.1), 1)}


def flac(seconds: float, rate: int, channels: int, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 440 * t)
    out = io.BytesIO()
    sf.write(out, np.stack([wave] * channels, axis=1).astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def png_4096_flat() -> bytes:
    """~60 KB of PNG that decodes to 4096 x 4096 RGB (48 MiB): allowed by the default bounds."""
    pixels = np.full((4096, 4096, 3), (120, 30, 200), np.uint8)
    pixels[::64, ::64] = 0
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", optimize=True)
    return out.getvalue()


def flac_8ch_384k_constant(seconds: int = 29) -> bytes:
    """~95 KB of FLAC (constant subframes): 29 s of 8 channels at 384 kHz, allowed by the default bounds."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", 384000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.full((384000, 8), 0.1, np.float32)
        for _ in range(seconds):
            f.write(block)
    return out.getvalue()


def large_inputs(predictor, rules: dict) -> dict:
    """Section 4: the predictor's single decode vs decoding twice (image) / the whole clip (audio)."""
    png, wav = png_4096_flat(), flac_8ch_384k_constant()
    image_state = predictor.readers["image"].state

    def image_twice() -> None:  # the former predictor: the decoded image held while the bytes decode again
        normalized, _ = portable.decode_image(png, predictor.rules["image"])
        again = Image.open(io.BytesIO(png))
        again.draft("RGB", (image_state["size"], image_state["size"]))
        portable.to_square(again.convert("RGB"), image_state["size"], image_state["fit"])  # convert: a copy
        del normalized

    def audio_whole() -> None:
        portable.decode_audio(wav, predictor.rules["audio"])
    out = {}
    for name, data, ours, naive in (("png_4096x4096", png, lambda: predictor.features(image=png), image_twice),
                                     ("flac_29s_8ch_384k", wav, lambda: predictor.features(audio=wav), audio_whole)):
        a, b = measured(ours, repeats=3), measured(naive, repeats=3)
        out[name] = {"bytes": len(data), "predictor": a, "naive": b, **ratios(a, b)}
    return out


def over_limit_requests(folder: Path, predictor, rows: int) -> dict:
    """Section 5: MLflow's scoring path on over-limit bodies, guarded vs MLflow's own parsing."""
    import tempfile

    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow.models.signature import ModelSignature
    from mlflow.pyfunc import scoring_server
    from mlflow.types.schema import ColSpec, Schema

    import pandas as pd

    from mmpipe.deploy.mlflow_model import OUTPUT
    from mmpipe.deploy.registry import MODEL_CODE

    columns = list(predictor.request_columns())
    signature = ModelSignature(inputs=Schema([ColSpec("string", c, required=False) for c in columns]),
                               outputs=Schema([ColSpec("string", c) for c in ("label", "probabilities", "error")]))
    parquet = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(["a"] * rows)}), parquet, compression="zstd")
    bodies = {f"parquet_{rows}_rows": (parquet.getvalue(), "application/vnd.apache.parquet"),
              "csv_20000_rows": ("text\n" + "a\n" * 20_000, "text/csv"),
              "json_70000_rows": (json.dumps({"dataframe_records": [{"text": "a"}] * 70_000}), "application/json")}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(f"{tmp}/model", python_model=str(MODEL_CODE), artifacts={"bundle": str(folder)},
                                 signature=signature)
        model = scoring_server.load_model_with_mlflow_config(f"{tmp}/model")  # installs the guard
        schema = model.metadata.get_input_schema()
        guarded, unguarded = scoring_server.invocations, scoring_server.invocations.unguarded
        bundle_model = model._model_impl.python_model
        current = bundle_model.predict

        def former_answer(context, model_input, params=None):  # the pyfunc before the guard: the error on every row
            error = (f"request has {len(model_input):,} rows > {bundle_model.limits.max_rows:,} per request "
                     "(export.max_rows_per_request); send it in parts")
            return pd.DataFrame({"label": "", "probabilities": "", "error": [error] * len(model_input)}, columns=OUTPUT)
        for name, (body, content_type) in bodies.items():
            answers = {}

            def call(invoke, key) -> None:
                bundle_model.predict = current if key == "guarded" else former_answer
                try:
                    answers[key] = len(invoke(body, content_type, model, schema).response)
                except Exception as exc:  # MLflow's path raises for some bodies: its error is the answer
                    answers[key] = len(str(exc))
                finally:
                    bundle_model.predict = current
            a, b = measured(lambda: call(guarded, "guarded")), measured(lambda: call(unguarded, "mlflow"))
            out[f"request_{name}"] = {"body_bytes": len(body), "guarded": a | {"answer_bytes": answers["guarded"]},
                                      "mlflow_parsing_then_per_row_errors": b | {"answer_bytes": answers["mlflow"]},
                                      **ratios(a, b)}
    return out


def fixed_mmap_threshold() -> None:
    """glibc: large buffers always mapped, and unmapped when freed (the threshold otherwise grows with
    each large free, and later buffers come from a heap that never shrinks): so the resident-memory
    growth of one call measures what it allocated, not what earlier calls left mapped."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> None:
    fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="artifacts/deploy", help="a deployment bundle (export stage output)")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--over-rows", type=int, default=1_000_000, help="rows of the over-limit Parquet request")
    parser.add_argument("--out", default="reports/bench_hostile.json")
    args = parser.parse_args()
    rules = audio.Clean().model_dump()
    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}"}

    recording = flac(10.0, 48000, 2)
    ours = measured(lambda: portable.decode_audio(recording, rules), repeats=5)
    naive = measured(lambda: naive_audio(recording, rules["sample_rate"]), repeats=5)
    report["recording_10s_48k_stereo"] = {"decode_audio": ours, "naive": naive,
                                          **ratios(ours, naive)}

    bomb = flac(143.0, 96000, 8, silent=True)

    def bounded() -> None:
        try:
            portable.decode_audio(bomb, rules)
        except RejectedInput:
            pass
    ours, naive = measured(bounded, repeats=3), measured(lambda: naive_audio(bomb, rules["sample_rate"]))
    report["flac_8ch_96k_143s"] = {"bytes": len(bomb), "decode_audio": ours, "naive": naive,
                                   **ratios(ours, naive)}

    folder = Path(args.bundle)
    predictor = load_predictor(folder).Predictor(folder)
    report |= large_inputs(predictor, rules)  # before the 20,000 rows, whose freed heap would hide their growth
    rows = [{"text": "a"}] * args.rows

    def streamed() -> None:
        for _ in predictor.predict_rows(rows):
            pass

    def all_at_once() -> None:
        predictor.predict([predictor.features(**row) for row in rows])
    ours, naive = measured(streamed), measured(all_at_once)
    report[f"predictor_{args.rows}_text_rows"] = {"predict_rows": ours, "all_rows_at_once": naive,
                                                  **ratios(ours, naive)}
    report |= over_limit_requests(folder, predictor, args.over_rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
