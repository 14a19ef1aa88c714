"""The deployment bundle: built, verified against the pipeline, and run alone with only its four dependencies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import png_bytes
from mmpipe import params
from mmpipe.deploy.bundle import RUNTIME
from mmpipe.deploy.verify import failed_checks, load_predictor, raw_test_items
from mmpipe.features.loader import FeatureSet

# Runs predict.py with imports limited to the standard library, the bundle's own modules and its five
# runtime dependencies (with what they import themselves): anything else (torch, mmpipe, ...) fails.
# two float16 steps of a log-mel value below 32 (2^-6): how far an AVX2 CPU's batch-size-dependent rounding moves them
FLOAT16_STEPS = 2 ** -6


def runtime_modules(roots=tuple(RUNTIME.values())) -> set[str]:
    """Top-level modules of the runtime distributions and of everything they require (installed metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return {module for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(d) in seen for d in dists)}


GUARD = r"""
import importlib.abc, os, runpy, sys
BUNDLE = {f[:-3] for f in os.listdir(".") if f.endswith(".py")}  # its own modules (predict, portable, inputs, ...)
ALLOWED = set(%r) | BUNDLE | {"_soundfile", "_cffi_backend"}
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in ALLOWED:
            return None
        raise ImportError(f"the bundle imported {name}, which is not one of its dependencies")
sys.meta_path.insert(0, Guard())
sys.argv = ["predict.py", *sys.argv[1:]]
runpy.run_path("predict.py", run_name="__main__")
""" % sorted(runtime_modules())


def test_bundle_reproduces_the_pipeline(bundle):
    checks = bundle["checks"]
    assert checks["fp32_onnx_vs_pytorch_max_abs_logit_diff"] <= 1e-4
    # the predictor's own preprocessing of the raw files gives the evaluated accuracy
    assert abs(checks["predictor_raw_test_accuracy_fp32"] - bundle["eval"]["test"]["accuracy"]) <= 0.005
    chosen = bundle["compress"]["chosen"]
    assert abs(checks["predictor_raw_test_accuracy"] - bundle["compress"]["variants"][chosen]["test_accuracy"]) <= 0.005
    assert checks["predictor_input_errors"] == [] and failed_checks(checks, params.ExportParams()) == []
    # audio as recordings come (22.05/44.1/48 kHz stereo, FLAC/WAV): the bundle computes the pipeline's
    # very features (one resampler, one PCM16 conversion), so the predictions agree everywhere; metadata
    # as a CSV or a form sends it (every cell a string) gives the typed record's features
    parity = checks["conversion_parity"]
    assert list(parity) == ["audio", "tabular"] and list(parity["tabular"]) == ["cells as text"]
    assert set(parity["audio"]) == {"22.05 kHz stereo", "44.1 kHz stereo", "48 kHz stereo"}
    for variant, figures in (*parity["audio"].items(), *parity["tabular"].items()):
        assert figures["items"] > 10 and figures["accepted_by_both"] == figures["items"], variant
        # the same features: bit-identical on AVX-512; on AVX2 the mel projection rounds by how many clips are
        # batched together, a float16 step of the log-mel at most (docs/architecture.md, "Deployment bundle")
        assert figures["top1_agreement"] == 1.0 and figures["max_abs_input_diff"] <= FLOAT16_STEPS, variant
    failing = checks | {"conversion_parity": {"audio": {"44.1 kHz stereo": {**parity["audio"]["44.1 kHz stereo"],
                                                                             "top1_agreement": 0.99}}}}
    assert failed_checks(failing, params.ExportParams()) == [
        "export check failed: audio as 44.1 kHz stereo: the predictor and the pipeline agree on 0.9900 of test "
        "items (< export.min_conversion_agreement 0.995)"]


def test_model_card_describes_this_data_not_the_builtin_digits(bundle):
    import yaml

    text = (bundle["folder"] / "MODEL_CARD.md").read_text()
    assert text.startswith("---\n")
    _, meta, card = text.split("---\n", 2)
    card = card.lstrip("\n")
    meta = yaml.safe_load(meta)  # the front matter: for machines (registries, Hub cards)
    test = bundle["eval"]["test"]
    result = meta["model-index"][0]["results"][0]
    assert result["task"]["type"] == "multimodal-classification" and result["dataset"]["split"] == "test"
    assert {(m["type"], m["value"]) for m in result["metrics"]} >= {
        ("accuracy", round(test["accuracy"], 6)), ("f1", round(test["f1_macro"], 6)),
        ("accuracy", round(bundle["compress"]["variants"][bundle["compress"]["chosen"]]["test_accuracy"], 6))}
    assert meta["inputs"][:3] == ["image", "text", "audio"] and meta["pretrained_parts"] == []
    assert meta["target"] == {"type": "category", "column": "label"}
    assert card.startswith("# Model card: mmpipe-fusion — 10-class classifier from image + text + audio")
    assert "digit" not in card.lower()
    assert "python predict.py --image FILE --text" in card
    assert "of 0.1–30 s, 4,000–384,000 Hz, at most 16 channels" in card  # clean's rules, as shipped
    assert "Pretrained encoders" not in card  # small CNNs trained from scratch: no weights to credit


def test_manifest_lists_every_file_with_its_checksum(bundle):
    folder = bundle["folder"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert [i["name"] for i in manifest["inputs"]] == ["image", "text", "text_length", "audio", "tabular_numeric",
                                                       "tabular_categories", "available"]
    assert all(i["shape"][0] == "batch" for i in manifest["inputs"])
    assert manifest["preprocessing"]["audio"]["sample_rate"] == 16000 and manifest["labels"] == [str(d) for d in range(10)]
    assert (folder / "requirements.txt").read_text().splitlines()[0].startswith("numpy==")
    assert "Verification (export stage)" in (folder / "MODEL_CARD.md").read_text()


def test_conversion_parity_in_chunks_and_raw_items_read_on_demand(bundle, tiny_corpus, tiny_model):
    from mmpipe.deploy.verify import conversion_parity
    from mmpipe.training.model_io import load_model
    from mmpipe.modalities import names

    test = FeatureSet(tiny_corpus / "features", split="test")
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, list(names()))
    assert len(items) == len(test) and items[3] == list(items)[3]  # by position or in order: the same bytes
    dataset = json.loads((tiny_corpus / "clean/dataset.json").read_text())
    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"], model="fp32")
    chunked = conversion_parity(bundle["folder"], predictor, tiny_corpus / "features", dataset, load_model(tiny_model),
                                test, items, chunk=5)
    whole = bundle["checks"]["conversion_parity"]  # 5 at a time or all at once: the same figures
    assert {m: list(v) for m, v in chunked.items()} == {m: list(v) for m, v in whole.items()}
    for m, variants in whole.items():
        for variant, figures in variants.items():
            other = chunked[m][variant]
            assert {k: v for k, v in other.items() if k != "max_abs_input_diff"} == {
                k: v for k, v in figures.items() if k != "max_abs_input_diff"}, variant
            assert abs(other["max_abs_input_diff"] - figures["max_abs_input_diff"]) <= FLOAT16_STEPS, variant


def complete_test_sample(tiny_corpus, folder) -> tuple[list, int, list[str]]:
    """The raw test items (image, text, audio), the first with all three, and its command-line flags (its files
    written into ``folder``)."""
    test = FeatureSet(tiny_corpus / "features", split="test")
    modalities = ["image", "text", "audio"]
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, modalities)
    i = next(k for k, item in enumerate(items) if all(item[m] is not None for m in modalities))
    (folder / "x.png").write_bytes(items[i]["image"])
    (folder / "x.audio").write_bytes(items[i]["audio"])
    return items, i, ["--image", str(folder / "x.png"), "--audio", str(folder / "x.audio"),
                      "--text", items[i]["text"].decode()]


def test_bundle_alone_with_only_its_dependencies_predicts_raw_files(bundle, tiny_corpus, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(bundle["folder"], alone)
    items, i, args = complete_test_sample(tiny_corpus, tmp_path)
    proc = subprocess.run([sys.executable, "-I", "-c", GUARD, *args], cwd=alone, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4 and answer["label"] in answer["probabilities"]

    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
    expected = predictor.predict([predictor.features(**items[i])])[0]
    assert answer["label"] == expected["label"]

    blocked = subprocess.run([sys.executable, "-I", "-c", GUARD.replace('runpy.run_path("predict.py", run_name="__main__")',
                                                                         "import torch")], cwd=alone, capture_output=True,
                             text=True, timeout=60)
    assert blocked.returncode != 0 and "not one of its dependencies" in blocked.stderr  # the guard does guard


def test_answers_carry_calibrated_scores_a_conformal_set_and_an_explanation_with_only_the_bundle(bundle, tiny_corpus,
                                                                                               tmp_path):
    items, i, args = complete_test_sample(tiny_corpus, tmp_path)
    proc = subprocess.run([sys.executable, "-I", "-c", GUARD, *args, "--explain", "--alpha", "0.05"],
                          cwd=bundle["folder"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert set(answer) == {"label", "probabilities", "prediction_set", "alpha", "explanation"} and answer["alpha"] == 0.05
    manifest = json.loads((bundle["folder"] / "manifest.json").read_text())
    fitted = manifest["models"]["shipped"]["calibration"]
    assert len(fitted["thresholds"]["0.05"]) == 15  # every availability pattern of the four modalities
    q = fitted["thresholds"]["0.05"]["image+text+audio"]
    assert answer["prediction_set"] == [c for c, p in answer["probabilities"].items() if q is None or p >= 1 - q - 1e-6]
    # the explanation: the answer's probability with each subset of the three given modalities, Shapley values
    # that add up to all - none (rounded to 1e-6 each)
    why = answer["explanation"]
    assert why["of"] == f"probability of {answer['label']!r}" and list(why["shapley"]) == ["image", "text", "audio"]
    assert why["all"] == answer["probabilities"][answer["label"]] and len(why["subsets"]) == 7
    assert abs(sum(why["shapley"].values()) - (why["all"] - why["none"])) < 1e-5
    # temperature scaling changes the probabilities, never the answer
    predict = load_predictor(bundle["folder"])
    raw = predict.Predictor(bundle["folder"], calibrated=False)
    plain = raw.predict([raw.features(**items[i])])[0]
    assert plain["label"] == answer["label"] and set(plain) == {"label", "probabilities"}
    assert fitted["temperature"]["global"] != 1.0 and plain["probabilities"] != answer["probabilities"]
    refused = subprocess.run([sys.executable, "predict.py", "--text", "seven", "--alpha", "0.3"], cwd=bundle["folder"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "predict.py: error: argument --alpha: alpha 0.3 was not calibrated for this bundle (choose from 0.05, 0.1, 0.2)")
    assert bundle["checks"]["predictor_vs_pipeline_set_agreement"] == 1.0


def test_manifest_rows_with_bad_inputs_get_errors_and_the_rest_are_predicted(bundle, tmp_path):
    (tmp_path / "good.png").write_bytes(png_bytes(size=(28, 28)))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "m.csv").write_text("id,image,audio,text\n"
                                    "a,good.png,,seven\n"
                                    "b,broken.png,,\n"
                                    "c,missing.wav,,\n"
                                    "d,,,\u200b \n"
                                    "e,,,nine\n")
    proc = subprocess.run([sys.executable, "-I", "-c", GUARD, "--manifest", str(tmp_path / "m.csv")],
                          cwd=bundle["folder"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert "label" in rows[0] and "label" in rows[4]
    assert rows[1]["error"].startswith("not a readable image")
    assert rows[2]["error"].startswith("missing.wav: cannot read")
    assert rows[3]["error"] == "text is empty after normalisation"


def test_predict_cli_refuses_what_would_hang_or_crash_per_row_or_in_one_line(bundle, tmp_path):
    """A FIFO named by a row (or as the manifest) used to block for ever; bad flags gave tracebacks;
    one invalid UTF-8 byte made the rest of a CSV unreadable."""
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "m.csv").write_bytes(b"id,image,text\n"
                                     b"a,,seven\n"
                                     b"b,pipe.png,\n"
                                     b"c,,caf\xe9 latin-1\n"
                                     b"d,,nine\n")
    predict = [sys.executable, "-I", "-c", GUARD]
    proc = subprocess.run([*predict, "--manifest", str(tmp_path / "m.csv")], cwd=bundle["folder"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r.get("id") for r in rows] == ["a", "b", None, "d"] and rows[2]["row"] == 3
    assert "label" in rows[0] and "label" in rows[3]
    assert rows[1]["error"] == "pipe.png: not a regular file"
    assert rows[2]["error"].endswith("m.csv: row 3: column 'text' is not valid UTF-8")
    whole = subprocess.run([*predict, "--manifest", str(tmp_path / "pipe.png")], cwd=bundle["folder"],
                           capture_output=True, text=True, timeout=120)
    assert whole.returncode == 1 and json.loads(whole.stdout)["error"].endswith("pipe.png: not a regular file")
    for flags, message in ((["--batch-size", "-1", "--text", "a"], "argument --batch-size: must be at least 1 (got -1)"),
                           (["--model", "int4", "--text", "a"], "argument --model: 'int4' is not a model of this bundle"),
                           (["--device", "cuda", "--text", "a"], "argument --device: no CUDA execution provider in this")):
        bad = subprocess.run([*predict, *flags], cwd=bundle["folder"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_the_predictor_takes_the_cuda_provider_when_onnxruntime_offers_it(bundle, monkeypatch):
    """--device auto runs on the CPU here (no onnxruntime-gpu) and would put CUDA first where it is offered;
    --device cuda without it is refused above in one line."""
    predict = load_predictor(bundle["folder"])
    assert predict.providers("auto") == predict.providers("cpu") == ["CPUExecutionProvider"]
    assert predict.Predictor(bundle["folder"], device="auto").session.get_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(predict.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert predict.providers("cuda") == predict.providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert predict.providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="device must be cpu, cuda or auto"):
        predict.providers("tpu")


def test_the_drift_monitor_names_the_modality_of_a_shifted_window_of_real_files(bundle, tiny_corpus, tmp_path):
    """The bundle's monitor on windows of the raw test files as users send them (PNG, WAV, text, metadata
    columns in a CSV): quiet as they are; darkened photos -> image; one metadata column moved by 4 standard
    deviations -> tabular (the tiny test split has ~20 rows with it: 2 sd at 500 rows is bench/drift.py's);
    exit status 1 on drift. Its reference is small and its false-alarm rate stated."""
    import csv
    import io

    import numpy as np
    from PIL import Image

    manifest = json.loads((bundle["folder"] / "manifest.json").read_text())
    monitor = manifest["monitor"]
    assert (bundle["folder"] / monitor["file"]).stat().st_size < 2_000_000 and monitor["false_alarm"] == 0.05
    assert 0 <= monitor["false_alarm_measured"] <= 0.1 and monitor["threshold"] > 0
    predictor = load_predictor(bundle["folder"]).Predictor(bundle["folder"])
    columns = predictor.request_columns()
    record_columns = [c for c, (m, kind) in columns.items() if kind == "record"]
    test = FeatureSet(tiny_corpus / "features", split="test")
    modalities = list(predictor.modalities)
    items = raw_test_items(tiny_corpus / "raw", tiny_corpus / "clean", test.sample_ids, modalities)

    def number(value) -> float | None:  # a metadata cell that reads as a number ("n/a" and the like do not)
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    records = [json.loads(it["tabular"]) for it in items if it["tabular"] is not None]
    present = {c["name"]: [v for v in (number(r.get(c["name"])) for r in records) if v is not None]
               for c in predictor.readers["tabular"].encoding.numeric}
    shifted_column = max(present, key=lambda c: len(present[c]))  # the numeric column the most rows have
    spread = float(np.std(present[shifted_column]))

    def window(name: str, darker: bool = False, moved: bool = False) -> subprocess.CompletedProcess:
        rows = []
        for i, item in enumerate(items):
            row = {}
            if item["image"] is not None:
                data = item["image"]
                if darker:
                    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    out = io.BytesIO()
                    Image.fromarray((pixels * 0.5).astype(np.uint8)).save(out, "PNG")
                    data = out.getvalue()
                (tmp_path / f"{name}{i}.png").write_bytes(data)
                row["image"] = f"{name}{i}.png"
            if item["audio"] is not None:
                (tmp_path / f"{name}{i}.wav").write_bytes(item["audio"])
                row["audio"] = f"{name}{i}.wav"
            if item["text"] is not None:
                row["text"] = item["text"].decode()
            if item["tabular"] is not None:
                record = json.loads(item["tabular"])
                if moved and number(record.get(shifted_column)) is not None:
                    record[shifted_column] = number(record[shifted_column]) + 4 * spread
                row |= {c: "" if record.get(c) is None else str(record[c]) for c in record_columns}
            rows.append(row)
        with open(tmp_path / f"{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["image", "audio", "text", *record_columns])
            writer.writeheader()
            writer.writerows(rows)
        return subprocess.run([sys.executable, "-I", "-c", GUARD, "--monitor", str(tmp_path / f"{name}.csv")],
                              cwd=bundle["folder"], capture_output=True, text=True, timeout=120)

    same = window("same")
    assert same.returncode == 0, same.stdout + same.stderr
    report = json.loads(same.stdout)
    assert not report["drifted"] and report["rows"] == len(items) and report["unreadable_rows"] == 0
    assert {"image.brightness", "audio.loudness", "text.oov_rate", f"tabular.{shifted_column}", "audio.model"} \
        <= set(report["statistics"])
    for name, kwargs, modality in (("dark", {"darker": True}, "image"), ("moved", {"moved": True}, "tabular")):
        proc = window(name, **kwargs)
        report = json.loads(proc.stdout)
        assert proc.returncode == 1 and report["drifted"] and report["modality"] == modality, (name, report)
        assert report["score"] > report["threshold"]


def test_the_fp16_model_ships_verified_and_calibrated_and_the_predictor_runs_it(bundle, tiny_corpus, tmp_path):
    """model_fp16.onnx (for a GPU's execution provider): smaller than the fp32 file, its parity with fp32 measured by
    export on the whole test split and stated in the card, calibrated like the others; predict.py --model fp16
    answers raw files like the fp32 model."""
    folder, checks = bundle["folder"], bundle["checks"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["models"]["fp16"]["file"] == "model_fp16.onnx" and "model_fp16.onnx" in manifest["files"]
    assert (folder / "model_fp16.onnx").stat().st_size < 0.8 * (folder / "model_fp32.onnx").stat().st_size  # (graph: not halved)
    assert checks["fp16_vs_fp32_max_abs_logit_diff"] < 0.05 and checks["fp16_vs_fp32_top1_agreement"] >= 0.99
    assert manifest["models"]["fp16"]["calibration"]["alpha"] == manifest["models"]["shipped"]["calibration"]["alpha"]
    assert "fp16 (`model_fp16.onnx`, for a GPU) vs fp32 on the CPU provider" in (folder / "MODEL_CARD.md").read_text()
    items, _, args = complete_test_sample(tiny_corpus, tmp_path)
    answers = {}
    for which in ("fp32", "fp16"):
        proc = subprocess.run([sys.executable, "-I", "-c", GUARD, *args, "--model", which], cwd=folder,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answers[which] = json.loads(proc.stdout)
    assert answers["fp16"]["label"] == answers["fp32"]["label"]
    for label, p in answers["fp32"]["probabilities"].items():
        assert abs(answers["fp16"]["probabilities"][label] - p) < 0.02


def test_an_fp16_model_that_crashes_the_runtime_is_left_out_not_the_stage(tiny_corpus, tmp_path):
    """The attention fusion's float16 graph makes ONNX Runtime's CPU provider segfault when the session opens:
    write_fp16 probes it in a process of its own and ships no fp16 model instead of killing export; the concat
    fusion's converts and runs."""
    from mmpipe.compress.onnx_model import export_onnx, onnx_feeds
    from mmpipe.deploy.bundle import write_fp16
    from mmpipe.features.loader import FeatureSet, feature_modalities
    from mmpipe.training.model_io import build_model, model_config
    features = tiny_corpus / "features"
    modalities, train = list(feature_modalities(features)), FeatureSet(features, split="train")
    val = FeatureSet(features, split="val")
    for fusion, shipped in (("attention", False), ("concat", True)):
        config = model_config(modalities, train.state, params.ModelParams(fusion=fusion, dim=16, hidden=16,
                                                                          attention_heads=2).model_dump(), train.target)
        model = build_model(config).eval()
        export_onnx(model, onnx_feeds(val.get(np.arange(8)), model), tmp_path / f"{fusion}.onnx")
        assert write_fp16(tmp_path / f"{fusion}.onnx", tmp_path / f"{fusion}_fp16.onnx") is shipped
        assert (tmp_path / f"{fusion}_fp16.onnx").exists() is shipped
