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
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import soundfile as sf
from PIL import Image

from bench.hostile_inputs import flac_8ch_384k_constant, png_4096_flat
from conftest import free_port, http_server, png_bytes
from mmpipe.deploy.export import example_request
from mmpipe.deploy.verify import load_predictor, raw_test_items
from mmpipe.deploy.registry import point_alias, register
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


JSON, CSV, PARQUET = "application/json", "text/csv", "application/vnd.apache.parquet"


def parquet_body(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(v).dictionary_encode() if isinstance(v[0], str) else pa.array(v)
                             for k, v in columns.items()}), out, compression="zstd", write_statistics=False)
    return out.getvalue()


def send(port: int, body: str | bytes, content_type: str, raw: bool = False) -> tuple[int, Any]:
    """POST a body as it is; -> (HTTP status, the answer: parsed JSON, or bytes when ``raw``)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": content_type},
                                     data=body.encode() if isinstance(body, str) else body)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read()
    return status, answer if raw else json.loads(answer)


def rss_growth(pid: int, action) -> tuple[int, Any]:
    """(peak resident memory of the process tree during ``action`` minus its resident memory before,
    what ``action`` returned): the peaks (VmHWM) are reset first (/proc/<pid>/clear_refs)."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for proc in processes:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    before = sum(proc.memory_info().rss for proc in processes)
    result = action()
    return tree_peak_bytes(pid) - before, result


def post(port: int, records: list[dict]) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["predictions"]


def test_mlflow_models_serve_answers_requests_and_attacks_row_by_row_and_refuses_over_limit_ones_in_o1(bundle, tiny_corpus, attacks, tmp_path):
    import mlflow

    previous = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        experiment = mlflow.create_experiment("serve-test", artifact_location=(tmp_path / "artifacts").as_uri())
        test = FeatureSet(tiny_corpus / "features", split="test")
        items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, list(names()))
        with mlflow.start_run(experiment_id=experiment):
            registered = register(bundle["folder"], "tiny-fusion", example_request(load_predictor(bundle["folder"]).Predictor(bundle["folder"]), items),
                                  {"test_accuracy": bundle["eval"]["test"]["accuracy"]}, {"shipped_variant": "int8"})
            point_alias("tiny-fusion", "champion", registered["version"])
        # the version carries the model card as its description, the tags, and the metrics of its logged model
        client = mlflow.MlflowClient()
        version = client.get_model_version("tiny-fusion", "1")
        assert version.description == (bundle["folder"] / "MODEL_CARD.md").read_text() and version.tags["shipped_variant"] == "int8"
        logged = client.get_logged_model(registered["model_id"])
        assert {m.key: m.value for m in logged.metrics} == {"test_accuracy": bundle["eval"]["test"]["accuracy"]}
        assert logged.tags["shipped_variant"] == "int8" and str(logged.status) == "READY"
    finally:
        mlflow.set_tracking_uri(previous)
    assert registered["model_uri"] == "models:/tiny-fusion/1" and registered["version"] == "1"
    registered["model_uri"] = "models:/tiny-fusion@champion"

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # uvicorn
    serve = [mlflow_cli, "models", "serve", "-m", registered["model_uri"], "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    record_columns = [c for c, (_, kind) in load_predictor(bundle["folder"]).Predictor(bundle["folder"]).request_columns().items()
                      if kind == "record"]
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
        many = post(port, [{"text": "a"}] * 9_000)  # under the limit: all predicted, a batch at a time
        assert len(many) == 9_000 and all(r["label"] and not r["error"] for r in many)
        # rows with none of the request columns are each answered with their error, never dropped
        for body, content_type in ((json.dumps({"dataframe_records": [{}, {}]}), JSON),
                                   (json.dumps({"dataframe_records": [{"who": 1}, {"what": "x"}]}), JSON),
                                   ("who,what\n1,x\n2,y\n", CSV), (parquet_body({"who": [1, 2]}), PARQUET)):
            status, answer = send(port, body, content_type)
            assert status == 200 and [r["error"].split(" (")[0] for r in answer["predictions"]] == \
                ["no input: the row has none of the request columns"] * 2, (body, answer)
        # typed JSON cells in the request columns: taken as a CSV row would carry them, not a failed request
        status, answer = send(port, json.dumps({"dataframe_records": [{"text": 7, **{c: 31 for c in record_columns}}]}), JSON)
        assert status == 200 and answer["predictions"][0]["label"], answer
        assert post(port, [{"text": "seven"}])[0]["label"]  # still answering
        peak = tree_peak_bytes(server.pid)
        assert peak < PEAK_LIMIT, f"the server peaked at {peak / 2**20:.0f} MiB"

        # over the limits: one small error for the whole request, whatever the body makes when parsed
        over = {"json: 70,000 rows in 1 MB": (json.dumps({"dataframe_records": [{"text": "a"}] * 70_000}), JSON, 400),
                "csv: 20,000 rows in 40 KB": ("text\n" + "a\n" * 20_000, CSV, 400),
                "parquet: 1,000,000 rows in 3 KB": (parquet_body({"text": ["a"] * 1_000_000}), PARQUET, 400),
                "json: nested 100,000 deep": ("[" * 100_000 + "]" * 100_000, JSON, 400),
                "json: not JSON": ("{\"dataframe_records\": [", JSON, 400)}
        for name, (body, content_type, expected) in over.items():
            growth, (status, answer) = rss_growth(server.pid, lambda: send(port, body, content_type, raw=True))
            assert status == expected, (name, status, answer[:300])
            assert len(answer) < 1000 and json.loads(answer)["error_code"] == "BAD_REQUEST", (name, answer[:300])
            assert growth < 50 * 2**20, f"{name}: the server grew by {growth / 2**20:.0f} MiB"
        assert json.loads(send(port, over["csv: 20,000 rows in 40 KB"][0], CSV, raw=True)[1])["message"] == \
            "request has more than 10,000 rows (export.max_rows_per_request); send it in parts"
        assert post(port, [{"text": "seven"}])[0]["label"]  # still answering



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


def test_the_serving_guard_bounds_bytes_rows_columns_and_structure_before_parsing():
    """The guard's limits one by one, on small limits (the server test above runs the default ones
    through `mlflow models serve`)."""
    from mmpipe.deploy.mlflow_model import Limits, RequestRefused

    limits = Limits({"max_rows_per_request": 100, "max_request_bytes": 50_000}, ["image", "text", "age"])

    def refused(body, content_type) -> tuple[int, str]:
        with pytest.raises(RequestRefused) as info:
            limits.check(body, content_type)
        return info.value.status, str(info.value)

    assert refused(b"x" * 50_001, JSON) == (413, "request body is 50,001 bytes > 50,000 (export.max_request_mb); send it in parts")
    assert refused(json.dumps({"dataframe_split": {"columns": ["text"], "data": [["a"]] * 101}}), JSON)[1].startswith(
        "request has 101 rows > 100 per request")
    # 10,000 empty objects in 40 KB: refused from a count, before json.loads builds them
    status, message = refused(json.dumps({"dataframe_records": [{}] * 10_000}), JSON)
    assert status == 400 and message.startswith("request has more than 6,916 JSON objects, arrays and keys")
    # brackets inside strings are text, not structure: a long text of them is fine
    body, unknown = limits.check(json.dumps({"dataframe_records": [{"text": "{[:" * 5000}]}), JSON)
    assert unknown is None and body["dataframe_records"][0]["text"].startswith("{[:")
    assert refused("[" * 5_000 + "]" * 5_000, JSON) == (400, "request body is nested too deeply to be a request")
    assert refused(json.dumps({"dataframe_records": {"a": 1}}) + "x", JSON)[1].startswith("request body is not valid JSON")
    assert refused(",".join(f"c{i}" for i in range(80)) + "\n", CSV)[1] == "request has 80 columns > 67"
    assert refused("text\n" + '"a\nb"\n' * 101, CSV)[1].startswith("request has more than 100 rows")
    _, unknown = limits.check("text\n" + '"a\nb"\n' * 100, CSV)  # 200 newlines, 100 rows: accepted
    assert unknown is None
    assert refused(parquet_body({"text": ["a"] * 101}), PARQUET)[1].startswith("request has 101 rows > 100")
    # a small compressed body that decodes into a large one
    status, message = refused(parquet_body({"text": ["x" * 60_000] + ["y"] * 9}), PARQUET)
    assert status == 400 and message.startswith("request decodes to ") and message.endswith("> 50,000 (export.max_request_mb)")
    assert refused(b"PAR1 not really", PARQUET)[1].startswith("request body is not a readable Parquet file")
    # typed JSON cells become the text a CSV row carries; nested values stay (bad cells, as at clean)
    body, _ = limits.check(json.dumps({"dataframe_records": [{"age": 31, "text": True, "image": [1]}, {"age": 1.5}]}), JSON)
    assert body["dataframe_records"] == [{"age": "31", "text": "true", "image": [1]}, {"age": "1.5"}]
    assert limits.check(json.dumps({"dataframe_records": [{"who": 1}] * 3}), JSON)[1] == 3  # answered here, per row
