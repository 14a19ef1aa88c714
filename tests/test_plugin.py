"""The modality seam, proven from outside: a toy fifth modality defined in this file (a module object
registered for the test) goes through collect -> clean -> preprocess -> train one epoch -> ONNX
export -> bundle -> the bundle's predictor, without a line of the package knowing it."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import Field

from mmpipe import params
from mmpipe.compress.onnx_model import export_onnx, onnx_feeds, run_logits, session
from mmpipe.data.clean import clean
from mmpipe.names import DATASET_FILE
from mmpipe.data.collect import collect
from mmpipe.deploy import bundle
from mmpipe.deploy.verify import load_predictor
from mmpipe.features.loader import FeatureSet
from mmpipe.features.preprocess import preprocess
from mmpipe.modalities import names, register, unregister
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import RejectedInput
from mmpipe.training.model_io import load_model, to_model_inputs
from mmpipe.training.train import train
from mmpipe.schema import Strict

LENGTH = 6

# the toy's portable predictor input: shipped into the bundle as is (numpy only)
SENSOR_INPUT = '''
import numpy as np


class SensorInput:
    KIND = "string"
    columns = []

    def __init__(self, arrays, state, rules, folder):
        self.arrays, self.length = arrays, state["length"]

    def features(self, value):
        numbers = [float(x) for x in str(value).split(",")]
        if len(numbers) != self.length:
            raise ValueError(f"expected {self.length} numbers, got {len(numbers)}")
        return {self.arrays[0]: np.asarray(numbers, np.float32)}
'''


class SensorClean(Strict):
    length: int = Field(LENGTH, ge=1)


class SensorPreprocess(Strict):
    scale: float = Field(1.0, gt=0)


class SensorEncoder(Strict):
    width: int = Field(8, ge=1)


def sensor_clean(data: bytes, cfg) -> Cleaned:
    try:
        numbers = [float(x) for x in data.decode("utf-8").split(",")]
    except ValueError:
        raise RejectedInput("sensor_invalid", "sensor is not comma-separated numbers") from None
    if len(numbers) != cfg.length:
        raise RejectedInput("sensor_invalid", f"sensor has {len(numbers)} numbers, expected {cfg.length}")
    return Cleaned(",".join(repr(x) for x in numbers).encode(), converted=True, info={"count": len(numbers)})


class SensorFeatures:
    gpu = False
    stats = None

    def __init__(self, cfg, dataset: dict):
        self.length = dataset["clean_rules"]["sensor"]["length"]
        self.arrays = {"sensor": ((self.length,), np.float32)}

    def fit(self, train_values: list) -> None:
        pass

    def transform(self, items, ids, noise=None, *, errors, device="cpu"):
        out = np.zeros((len(items), self.length), np.float32)
        for i, item in enumerate(items):
            if item is not None:
                out[i] = [float(x) for x in item.split(",")]
        present = np.array([item is not None for item in items])
        if noise is not None and present.any():
            out[present] = noise(out[present])
        return {"sensor": out}

    def state(self) -> dict:
        return {"length": self.length}

    def save(self, folder) -> None:
        pass

    @classmethod
    def from_state(cls, folder, state):
        return cls(None, {"clean_rules": {"sensor": {"length": state["length"]}}})

    @staticmethod
    def state_files(state: dict) -> list[str]:
        return []


def sensor_encoder(state: dict, cfg: SensorEncoder, model):
    length = state["arrays"]["sensor"]["shape"][0]
    return torch.nn.Sequential(torch.nn.Linear(length, cfg.width), torch.nn.ReLU(), torch.nn.Linear(cfg.width, model.dim))


def toy_module(input_file: Path) -> types.ModuleType:
    module = types.ModuleType("sensor_modality")
    module.__dict__.update(
        NAME="sensor", EXTENSIONS=(".sensor",), INLINE=True, STORED_AS=pa.string(), INFO_COLUMNS={"count": pa.int32()},
        PARAMS={"clean": SensorClean, "preprocess": SensorPreprocess, "model": SensorEncoder},
        clean=sensor_clean, Features=SensorFeatures,
        CORRUPTIONS={"gaussian": lambda x, level, rng: x + rng.normal(0, 3 * level, x.shape).astype(np.float32)},
        build_encoder=sensor_encoder, PREDICTOR_INPUT=(input_file, "SensorInput"),
        describe_rules=lambda rules: f"{rules['length']} comma-separated numbers")
    return module


@pytest.fixture
def sensor(tmp_path):
    input_file = tmp_path / "sensor_input.py"
    input_file.write_text(SENSOR_INPUT)
    register(toy_module(input_file))
    yield
    unregister("sensor")


def write_manifest(path: Path, n: int = 120) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label", "text", "sensor"])
        for i in range(n):
            label = ("low", "high")[i % 2]
            level = 2.0 if label == "high" else -2.0
            sensor = ",".join(f"{x:.3f}" for x in rng.normal(level, 1.0, LENGTH)) if i % 7 else ""
            text = f"{rng.choice(['a', 'the', 'some'])} reading" if i % 5 else ""
            writer.writerow([f"s{i}", label, text, sensor if i != 3 else "1,2,oops"])


def test_a_fifth_modality_defined_in_a_test_goes_from_raw_to_the_bundles_predictor(sensor, tmp_path):
    assert names()[-1] == "sensor" and "sensor" in params.schema("clean").model_fields
    write_manifest(tmp_path / "data.csv")
    root = tmp_path / "run"
    for folder in ("raw", "clean", *(f"features/{m}" for m in names())):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"source": str(tmp_path / "data.csv")}), root / "raw")
    clean_metrics = clean(params.validate("clean", {"workers": 1, "min_per_class": 2}), root / "raw", root / "clean")
    assert clean_metrics["rejects_by_code"].get("sensor_invalid") == 1  # row 3: "1,2,oops"
    assert clean_metrics["available"]["sensor"] == 120 - len(range(0, 120, 7)) - 1
    for m in names():
        preprocess(m, params.validate("preprocess", {"workers": 1}), root / "clean", root / "features" / m)

    model_params = params.validate("model", {"dim": 16, "hidden": 16, "encoders": {"sensor": {"width": 4}}})
    modalities = ["text", "sensor"]
    result = train(params.TrainParams(epochs=1, batch_size=16, device="cpu"), model_params, root / "features",
                   modalities, root / "models" / "fusion", None)
    assert result["metrics"]["epochs_run"] == 1
    model = load_model(root / "models" / "fusion")
    assert model.modalities == modalities and list(model.encoders) == modalities

    test = FeatureSet(root / "features", split="test")
    feeds = onnx_feeds(test.get(np.arange(len(test))), model)
    assert list(feeds) == ["text", "text_length", "sensor", "available"] and feeds["sensor"].dtype == np.float32
    compressed = root / "compressed"
    compressed.mkdir()
    export_onnx(model, feeds, compressed / "fp32.onnx")
    (compressed / "model.onnx").write_bytes((compressed / "fp32.onnx").read_bytes())
    onnx_logits = run_logits(session(compressed / "fp32.onnx"), feeds)
    with torch.no_grad():
        torch_logits = model(to_model_inputs(test.get(np.arange(len(test))), modalities, torch.device("cpu"))).numpy()
    assert np.abs(onnx_logits - torch_logits).max() < 1e-4

    dataset = json.loads((root / "clean" / DATASET_FILE).read_text())
    out = root / "deploy"
    out.mkdir()
    manifest = bundle.build(out, compressed, "fp32", root / "features", dataset, modalities, None,
                            {"max_rows_per_request": 100, "max_item_bytes": 10_000, "batch_size": 8})
    assert "sensor_input.py" in manifest["files"] and manifest["preprocessing"]["sensor"]["input"]["class"] == "SensorInput"
    predictor = load_predictor(out).Predictor(out)
    assert predictor.request_columns() == {"text": ("text", "string"), "sensor": ("sensor", "string")}
    rows = [{"sensor": "2,2,2,2,2,2"}, {"sensor": "-2,-2,-2,-2,-2,-2", "text": "a reading"}, {"sensor": "1,2"}, {}]
    results = list(predictor.predict_rows(rows))
    assert results[2] == {"error": "sensor could not be processed: ValueError: expected 6 numbers, got 2"}
    assert results[3]["error"].startswith("no input")
    direct = [predictor.features(**row) for row in rows[:2]]
    expected = run_logits(session(out / "model.onnx"), {k: np.stack([d[k] for d in direct]) .astype(v.dtype)
                                                         for k, v in feeds.items()}).argmax(axis=1)
    assert [r["label"] for r in results[:2]] == [dataset["labels"][i] for i in expected]
