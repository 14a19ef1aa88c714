"""The deployment bundle: the chosen ONNX model (+ the fp32 one), the standalone predictor and the
modules it ships as they are, the fitted preprocessing state, manifest.json and MODEL_CARD.md.

Servable without this repository: the predictor needs only numpy, onnxruntime, soundfile, soxr and
pillow.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from mmpipe.modalities import MODALITIES
from mmpipe.modalities.base import array_names
from mmpipe.names import STATE_FILE

PACKAGE = Path(__file__).resolve().parents[1]
# the predictor and the helpers every modality's input class may import (see modalities/inputs.py)
SHIPPED_CODE = [PACKAGE / "deploy" / "predict.py", PACKAGE / "modalities" / "portable.py",
                PACKAGE / "modalities" / "logmel.py", PACKAGE / "modalities" / "tokenizer.py",
                PACKAGE / "trust" / "attribution.py", PACKAGE / "trust" / "drift.py",  # --explain, --monitor
                PACKAGE / "pretrain" / "retrieval.py"]  # --search
# preprocess's bookkeeping, and what lives inside the model (normalisation): not the predictor's business
NOT_SHIPPED_STATE = ("modality", "samples", "shard_rows", "shards", "labels", "mean", "std", "stats_of", "model_config",
                     "embedding", "target")
RUNTIME = {"numpy": "numpy", "onnxruntime": "onnxruntime", "soundfile": "soundfile", "soxr": "soxr", "pillow": "pillow"}
ONNX_TYPES = {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32",
              onnx.TensorProto.BOOL: "bool"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_spec(model: Path) -> list[dict[str, Any]]:
    """Name, dtype and shape (``"batch"`` for the dynamic axis) of each graph input."""
    graph = onnx.load(str(model)).graph
    return [{"name": i.name, "dtype": ONNX_TYPES[i.type.tensor_type.elem_type],
             "shape": ["batch" if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]}
            for i in graph.input]


def preprocessing(features_root: Path, modalities: list[str]) -> tuple[dict, list[Path]]:
    """Per modality: its fitted state as the predictor needs it, and its input class (file, class,
    array names); plus the files to copy (the state's files and the input classes' modules)."""
    pre, files = {}, []
    for m in modalities:
        state = json.loads((features_root / m / STATE_FILE).read_text())
        module = MODALITIES[m]
        code, cls = module.PREDICTOR_INPUT
        pre[m] = {k: v for k, v in state.items() if k not in NOT_SHIPPED_STATE}
        pre[m]["input"] = {"file": Path(code).name, "class": cls, "arrays": array_names(state)}
        files += [features_root / m / name for name in module.Features.state_files(state)]
        files.append(Path(code))
    return pre, files


def build(out: Path, compressed: Path, chosen: str, features_root: Path, dataset: dict, modalities: list[str],
          git_commit: str | None, serving: dict[str, int], target: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the bundle into ``out`` (an empty folder), all but its model card; return the manifest.
    ``serving``: the request bounds (max_rows_per_request, max_item_bytes, max_request_bytes,
    batch_size); ``target``: the model's (type, options, fitted state: what its outputs mean; None: a class
    from ``dataset``'s labels). The manifest is written now because the bundle's predictor reads it (the export
    stage verifies the bundle through it before the card, which reports that, exists): ``seal``."""
    shutil.copyfile(compressed / "model.onnx", out / "model.onnx")
    shutil.copyfile(compressed / "fp32.onnx", out / "model_fp32.onnx")
    fp16 = write_fp16(out / "model_fp32.onnx", out / "model_fp16.onnx")
    pre, state_files = preprocessing(features_root, modalities)
    for path in dict.fromkeys([*SHIPPED_CODE, *state_files]):
        shutil.copyfile(path, out / path.name)
    extra = [name for m in modalities  # tokenizers, with a pretrained text model
             for name in MODALITIES[m].extra_requirements(pre[m])]
    runtime = {**RUNTIME, **{name: name for name in extra}}
    (out / "requirements.txt").write_text("".join(f"{name}=={metadata.version(dist)}\n" for name, dist in runtime.items()))
    target = target or {"type": "category", "column": "label", "state": {"labels": dataset["labels"]}}
    width = 1 if target["type"] == "number" else len(dataset["labels"])
    manifest = {
        "format": 1,
        "labels": dataset["labels"],  # the classes, or the tags ([] for a number)
        # what the model predicts and how its outputs are read (predict.py: Predictor.predict)
        "target": target,
        "modalities": modalities,
        "inputs": input_spec(out / "model.onnx"),
        "output": {"name": "logits", "shape": ["batch", width], "dtype": "float32",
                   "meaning": {"category": "class logits (softmax: probabilities)",
                               "number": "the standardised (transformed) value: x * std + mean, then expm1 if log",
                               "set": "tag logits (sigmoid: probabilities, >= threshold: the tag)"}[target["type"]]},
        "models": {"shipped": {"file": "model.onnx", "variant": chosen}, "fp32": {"file": "model_fp32.onnx", "variant": "fp32"},
                   **({"fp16": {"file": "model_fp16.onnx", "variant": "fp16",
                                "for": "a GPU: predict.py --model fp16 --device cuda (onnxruntime-gpu)"}} if fp16 else {})},
        "preprocessing": pre,
        # clean's per-item rules (size bounds included): the predictor accepts and rejects what clean did
        "clean": {m: dataset["clean_rules"][m] for m in modalities},
        "serving": serving,
        "predictor": {"command": "python predict.py " + " ".join(f"[--{m} ...]" for m in modalities)
                      + " | --manifest M.csv",
                      "requirements": "requirements.txt"},
        "versions": {"python": platform.python_version(), "git_commit": git_commit,
                     **{dist: metadata.version(dist) for dist in ("torch", "onnx", "onnxruntime", "numpy")}},
    }
    write_manifest(out, manifest)
    return manifest


# Opens a model in ONNX Runtime and runs it once on zeros, in a process of its own: some float16 graphs crash
# the runtime's CPU provider outright (a segfault when the session is created, seen with the attention fusion),
# which no exception handler in the export stage could catch.
FP16_PROBE = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
         "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
s.run(None, {i.name: np.zeros([d if isinstance(d, int) else 2 for d in i.shape], types[i.type]) for i in s.get_inputs()})
"""


def write_fp16(fp32: Path, out: Path) -> bool:
    """``fp32`` converted to float16 weights and arithmetic, float32 inputs and outputs (ONNX Runtime's converter,
    which keeps the ops it knows to be unsafe in float16 in float32): the model for a GPU's execution provider,
    half the file. False, and no file, when the conversion fails or ONNX Runtime cannot open and run the result
    (checked in a separate process: ``FP16_PROBE``); the bundle then ships without it and its card says so."""
    import subprocess
    import sys

    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    try:
        onnx.save(convert_float_to_float16(onnx.load(fp32), keep_io_types=True), out)
    except Exception:  # noqa: BLE001 - an op the converter cannot take: no fp16 model
        out.unlink(missing_ok=True)
        return False
    probe = subprocess.run([sys.executable, "-c", FP16_PROBE, str(out)], capture_output=True, timeout=300)
    if probe.returncode != 0:
        out.unlink(missing_ok=True)
        return False
    return True


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """manifest.json, with the sha256 of every other file of the bundle."""
    manifest["files"] = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def seal(out: Path, manifest: dict[str, Any], model_card: str) -> None:
    """Add the model card (written once, with the verification it reports) and digest it in the manifest."""
    (out / "MODEL_CARD.md").write_text(model_card)
    write_manifest(out, manifest)
