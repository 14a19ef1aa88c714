"""Serving under attack: the bundle's predictor (CLI) and `mlflow models serve` of the registered model
get decompression bombs, lying headers and a request of tens of thousands of tiny rows. Each input gets
its own error or a prediction, the serving process's peak memory (measured) stays under 1 GB, and the
server keeps answering."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
from PIL import Image

from conftest import free_port, http_server, png_bytes
from mmpipe.deploy.export import example_request, load_predictor, raw_test_items, register
from mmpipe.features.loader import FeatureSet
from mmpipe.modalities import names

PEAK_LIMIT = 1 << 30  # bytes: what a serving process may reach, whatever it is sent


def wav_declaring_1_hz(size: int) -> bytes:
    data = (np.sin(np.arange(size // 2) / 3.0) * 10000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 1, 2, 2, 16)  # PCM, mono, 1 Hz
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_8ch_96k(seconds: int = 143, unknown_length: bool = False) -> bytes:
    """~100 KB of FLAC that decodes to seconds x 96,000 x 8 float32 samples (440 MB at 143 s)."""
    out = io.BytesIO()
    with sf.SoundFile(out, "w", 96000, 8, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((96000, 8), np.float32)
        for _ in range(seconds):
            f.write(block)
    data = bytearray(out.getvalue())
    if unknown_length:  # STREAMINFO total samples = 0: "unknown", so no duration in the header
        fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
        data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def png_9000() -> bytes:
    out = io.BytesIO()
    Image.new("1", (9000, 9000)).save(out, format="PNG", optimize=True)  # ~10 KB -> 81 M pixels
    return out.getvalue()


def jpeg_with_orientation_as_ascii() -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHI4s", 0x0112, 2, 2, b"x\x00\x00\x00") + struct.pack("<I", 0)
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(out, "JPEG", exif=b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd)
    return out.getvalue()


# name -> (modality, bytes, the start of the expected error; None: a prediction)
def adversarial() -> dict[str, tuple[str, bytes, str | None]]:
    return {
        "wav_1hz_4k": ("audio", wav_declaring_1_hz(4_000), "audio sample rate 1 Hz is outside"),
        "wav_1hz_100k": ("audio", wav_declaring_1_hz(100_000), "audio sample rate 1 Hz is outside"),
        "flac_8ch_96k": ("audio", flac_8ch_96k(), "audio lasts 143.000s"),
        "flac_8ch_96k_no_length": ("audio", flac_8ch_96k(unknown_length=True), "audio lasts more than 30."),
        "png_9000x9000": ("image", png_9000(), "image is 9000x9000 > clean.image.max_pixels"),
        "png_above_pillow_bomb_limit": ("image", png_claiming(30000, 30000), "image too large to decode safely: Image size (900000000"),
        "jpeg_orientation_ascii": ("image", jpeg_with_orientation_as_ascii(), None),
        "png_ok": ("image", png_bytes(size=(28, 28)), None),
    }


@pytest.fixture(scope="module")
def attacks() -> dict:
    return adversarial()


def test_predictor_cli_answers_every_attack_per_row_within_1_gb(bundle, attacks, tmp_path):
    names = list(attacks)
    for name, (modality, data, _) in attacks.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
    rows = ["id,image,audio,text"] + [f"{n},{n}.bin,," if attacks[n][0] == "image" else f"{n},,{n}.bin," for n in names]
    rows += [f"t{i},,,a" for i in range(20_000)]  # a long manifest: read and predicted a batch at a time
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    # VmHWM, not getrusage's ru_maxrss: Linux keeps the latter across exec, so it would report pytest's own peak
    wrapper = ("import runpy, sys\nsys.argv = ['predict.py', '--manifest', sys.argv[1]]\n"
               "try:\n    runpy.run_path('predict.py', run_name='__main__')\nexcept SystemExit as exc:\n    code = exc.code\n"
               "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
               "print('PEAK_KB', hwm, file=sys.stderr)\nsys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, str(tmp_path / "m.csv")], cwd=bundle["folder"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(names) + 20_000
    for name, result in zip(names, results):
        expected = attacks[name][2]
        assert result["id"] == name
        if expected is None:
            assert "label" in result and "error" not in result, result
        else:
            assert result["error"].startswith(expected), (name, result)
    assert all("label" in r for r in results[len(names):])
    peak = int(proc.stderr.rsplit("PEAK_KB", 1)[1].split()[0]) * 1024
    assert peak < PEAK_LIMIT, f"the predictor peaked at {peak / 2**20:.0f} MiB"


def tree_peak_bytes(pid: int) -> int:
    """Peak resident memory (VmHWM) of a process and its children, summed."""
    total = 0
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


def post(port: int, records: list[dict]) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def test_mlflow_models_serve_answers_requests_and_attacks_row_by_row_within_1_gb(bundle, tiny_corpus, attacks, tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.create_experiment("serve-test", artifact_location=(tmp_path / "artifacts").as_uri())
        test = FeatureSet(tiny_corpus / "features", split="test")
        items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, list(names()))
        with mlflow.start_run(experiment_id=experiment):
            registered = register(bundle["folder"], "tiny-fusion", "champion", example_request(load_predictor(bundle["folder"]).Predictor(bundle["folder"]), items),
                                  {"test_accuracy": bundle["eval"]["test"]["accuracy"]}, {"shipped_variant": "int8"})
        # the version carries the model card as its description, the tags, and the metrics of its logged model
        client = mlflow.MlflowClient()
        version = client.get_model_version("tiny-fusion", "1")
        assert version.description == (bundle["folder"] / "MODEL_CARD.md").read_text() and version.tags["shipped_variant"] == "int8"
        logged = client.get_logged_model(registered["model_id"])
        assert {m.key: m.value for m in logged.metrics} == {"test_accuracy": bundle["eval"]["test"]["accuracy"]}
        assert logged.tags["shipped_variant"] == "int8"
    finally:
        mlflow.set_tracking_uri(previous)
    assert registered["model_uri"] == "models:/tiny-fusion@champion" and registered["version"] == "1"

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # uvicorn
    serve = [mlflow_cli, "models", "serve", "-m", registered["model_uri"], "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with http_server(serve, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env, tmp_path) as server:
        # ordinary requests
        records = example_request(load_predictor(bundle["folder"]).Predictor(bundle["folder"]), items).to_dict(orient="records") + [{"text": "nine"}, {"image": "not base64!"}]
        predictions = post(port, records)
        assert len(predictions) == 3
        predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
        first: dict = {}  # the first row as the predictor's raw inputs: files decoded, record columns gathered
        for column, (modality, kind) in predictor.request_columns().items():
            value = records[0][column]
            if kind == "record" and value is not None:
                first.setdefault(modality, {})[column] = value
            elif kind != "record":
                first[modality] = (base64.b64decode(value) if kind == "file" else value) or None
        assert predictions[0]["label"] == predictor.predict([predictor.features(**first)])[0]["label"]
        assert predictions[1]["label"] in [str(d) for d in range(10)] and predictions[1]["error"] == ""
        assert predictions[2]["error"] == "image is not valid base64" and predictions[2]["label"] == ""

        # the attacks, all in one request: one answer each
        answers = post(port, [{modality: base64.b64encode(data).decode()} for modality, data, _ in attacks.values()])
        for (name, (_, _, expected)), answer in zip(attacks.items(), answers):
            if expected is None:
                assert answer["label"] and not answer["error"], (name, answer)
            else:
                assert answer["error"].startswith(expected) and not answer["label"], (name, answer)
        # 1 MB of tiny rows: over export.max_rows_per_request, every row says so
        tiny = [{"text": "a"}] * 70_000
        assert len(json.dumps({"dataframe_records": tiny})) > 1_000_000
        refused = post(port, tiny)
        assert len(refused) == 70_000 and refused[0]["error"].startswith("request has 70,000 rows > 10,000 per request")
        many = post(port, [{"text": "a"}] * 9_000)  # under the limit: all predicted, a batch at a time
        assert len(many) == 9_000 and all(r["label"] and not r["error"] for r in many)
        assert post(port, [{"text": "seven"}])[0]["label"]  # still answering
        peak = tree_peak_bytes(server.pid)
    assert peak < PEAK_LIMIT, f"the server peaked at {peak / 2**20:.0f} MiB"


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


PEAK_PROBE = """
import json, sys
sys.path.insert(0, '.')
import predict
predictor = predict.Predictor()
def rss(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
growth = {}
for name in sys.argv[1:]:
    data = open(name, 'rb').read()
    predictor.features(**{name.split('.')[-1]: data})  # warm-up: lazy allocations, imports
    open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
    before = rss('VmRSS:')
    predictor.features(**{name.split('.')[-1]: data})
    growth[name] = rss('VmHWM:') - before
print(json.dumps(growth))
"""


def test_an_allowed_large_input_is_decoded_once_and_audio_only_as_far_as_the_model_hears(bundle, tmp_path):
    """A 60 KB 4096x4096 PNG was decoded twice (~200 MB); a 95 KB 8-channel 384 kHz FLAC was decoded,
    held and resampled whole (108 MB, 1 s of CPU) though the model hears 1.5 s."""
    from mmpipe import params
    from mmpipe.modalities.portable import decode_audio

    png, flac = png_4096_flat(), flac_8ch_384k_constant()
    assert len(png) < 100_000 and len(flac) < 100_000
    (tmp_path / "big.image").write_bytes(png)
    (tmp_path / "big.audio").write_bytes(flac)
    proc = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tmp_path / "big.image"), str(tmp_path / "big.audio")],
                          cwd=bundle["folder"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout)
    assert growth[str(tmp_path / "big.image")] < 70 * 2**20, growth  # one 48 MiB decode, no second one
    assert growth[str(tmp_path / "big.audio")] < 20 * 2**20, growth
    # the predictor reads ~2 s of the 29: the samples the model hears are the whole clip's, bit for bit
    rules = params.CleanParams().audio.model_dump()
    heard, _ = decode_audio(flac, rules, keep_seconds=1.5)
    whole, _ = decode_audio(flac, rules)
    assert len(heard) < 3 * 16000 < len(whole) and np.array_equal(heard[:24000], whole[:24000])
    for rate, channels in ((22050, 2), (44100, 2), (48000, 1), (8000, 1)):
        clip = np.random.default_rng(rate).normal(0, 0.1, (rate * 6, channels)).astype(np.float32)
        encoded = io.BytesIO()
        sf.write(encoded, clip, rate, format="WAV", subtype="PCM_16")
        heard, _ = decode_audio(encoded.getvalue(), rules, keep_seconds=1.5)
        whole, _ = decode_audio(encoded.getvalue(), rules)
        assert np.array_equal(heard[:24000], whole[:24000]), rate
