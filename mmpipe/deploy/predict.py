#!/usr/bin/env python3
"""Standalone predictor of the deployment bundle: raw inputs of the model's modalities in, JSON out.

Needs only numpy, onnxruntime, soundfile, soxr and pillow (requirements.txt next to this file) and
the files of this folder. Any modality may be left out, not all of them. One flag per modality of
the model (manifest.json: modalities; ``--help`` lists them): a file, a text, or a JSON object.

    python predict.py --image photo.jpg --audio clip.wav --text "a short description"
    python predict.py --manifest samples.csv      # a column per modality (a record modality: its
                                                  # own columns) and optional id; paths relative
                                                  # to the CSV; one JSON line per row
    python predict.py ... --model fp32            # the fp32 model instead of the shipped one
    python predict.py ... --device cuda           # ONNX Runtime's CUDA execution provider (onnxruntime-gpu);
                                                  # auto: CUDA when it is there, else the CPU (default: cpu);
                                                  # with --model fp16: the float16 model, half the file
    python predict.py ... --alpha 0.05            # sets/intervals that hold the truth 95 % of the time
    python predict.py ... --explain               # each modality's Shapley contribution to the answer
    python predict.py --monitor window.csv        # has this window of rows drifted from the training data?
                                                  # (which modality, which statistic; exit status 1 if so)
    python predict.py ... --embed                 # the aligned embedding of each modality given, and a fused one
    python predict.py --manifest M.csv --index I.npz             # embed a collection once, into an index
    python predict.py --image photo.jpg --search I.npz --among audio  # the recordings that match this photo
                                                  # (--embed/--index/--search: bundles built with pretrain on)

Every answer carries its conformal prediction set (a class, tags) or interval (a number) beside it, calibrated
on the validation split per modality-availability pattern: it holds the truth with probability >= 1 - alpha.

Every input is checked under the rules the training data was cleaned with (manifest.json: clean):
sizes from the header before decoding, bounded decoding, and any failure to read one input becomes
that row's {"error": ...}; the other rows are still predicted, and the exit status is then 1. Rows
are read and predicted a batch at a time, so memory does not grow with the length of the manifest.
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib
import itertools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the shipped helper modules next to this file

import portable  # noqa: E402


class InputError(Exception):
    """An input that cannot be turned into features (the message names the reason)."""


def providers(device: str = "cpu") -> list[str]:
    """ONNX Runtime execution providers for ``device``: cpu; cuda (onnxruntime-gpu's CUDA provider, the CPU one
    behind it for what CUDA lacks: a ValueError naming what this onnxruntime offers when it is not there); auto
    (CUDA when available, else the CPU)."""
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be cpu, cuda or auto (got {device!r})")
    have = ort.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ValueError(f"no CUDA execution provider in this onnxruntime {ort.__version__} (it offers "
                         f"{', '.join(have)}): install onnxruntime-gpu, or use --device cpu")
    return ["CPUExecutionProvider"]


class Predictor:
    InputError = InputError  # what ``features`` raises, for callers that hold only the predictor

    def __init__(self, folder: Path = HERE, model: str = "shipped", threads: int = 0, alpha: float | None = None,
                 calibrated: bool = True, device: str = "cpu"):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        file = self.manifest["models"][model]["file"]
        self.providers = providers(device)
        self.session = ort.InferenceSession(str(self.folder / file), options, providers=self.providers)
        self._options, self._embedder = options, None  # the aligned encoders' session, opened on first use (embed)
        # how far to trust an answer (manifest.json: models.<model>.calibration, fitted on the validation split):
        # temperature-scaled scores and a conformal set/interval per availability pattern; calibrated=False: raw
        self.calibration = self.manifest["models"][model].get("calibration") if calibrated else None
        self.alpha = None
        if self.calibration:
            self.alpha = self.calibration["alpha"] if alpha is None else alpha
            if f"{self.alpha:g}" not in self.calibration["thresholds"]:
                raise ValueError(f"alpha {self.alpha:g} was not calibrated for this bundle (choose from "
                                 f"{', '.join(self.calibration['thresholds'])})")
        self.inputs = {i["name"]: i for i in self.manifest["inputs"]}
        self.modalities = self.manifest["modalities"]
        self.rules = self.manifest["clean"]  # clean's per-item rules: the same bounds, the same rejections
        self.serving = self.manifest["serving"]
        self.readers = {m: self._reader(m, self.manifest["preprocessing"][m]) for m in self.modalities}

    def _reader(self, modality: str, pre: dict):
        """The modality's input class (raw input -> arrays), from a module shipped in this folder."""
        spec = pre["input"]
        if spec["file"] not in self.manifest["files"] or not spec["file"].endswith(".py"):
            raise ValueError(f"manifest.json: {modality}'s input module {spec['file']!r} is not a file of this bundle")
        cls = getattr(importlib.import_module(spec["file"][:-3]), spec["class"])
        return cls(spec["arrays"], pre, self.rules[modality], self.folder)

    def request_columns(self) -> dict[str, tuple[str, str]]:
        """Manifest / request column -> (modality, kind): a file or text modality has its own column,
        a record modality one column per field (its ``columns``)."""
        out = {}
        for m, reader in self.readers.items():
            for column in (reader.columns if reader.KIND == "record" else [m]):
                out[column] = (m, reader.KIND)
        return out

    # ------------------------------------------------------------------ samples -> predictions

    def features(self, **given):
        """One sample's model inputs (no batch axis) from raw inputs keyed by modality (bytes of a file,
        a text, a record's mapping); modalities left out are marked unavailable. Raises InputError (one
        line) when an input cannot be used or none is given."""
        unknown = sorted(set(given) - set(self.modalities))
        if unknown:
            raise InputError(f"unknown input {unknown[0]!r}: this model takes {', '.join(self.modalities)}")
        if all(given.get(m) is None for m in self.modalities):
            raise InputError(f"no input: give at least one of {', '.join(self.modalities)}")
        out, available = {}, []
        for m in self.modalities:
            value, arrays = given.get(m), None
            if value is not None:
                try:
                    arrays = self.readers[m].features(value)  # None: nothing usable (a record of empty cells)
                except portable.RejectedInput as exc:
                    raise InputError(exc.message) from None
                except Exception as exc:  # never one input's failure beyond its own row
                    raise InputError(f"{m} could not be processed: {portable.describe(exc)}") from None
            out |= arrays or {}
            available.append(arrays is not None)
        if not any(available):
            raise InputError(f"no usable input: every value given for {', '.join(m for m in given if given[m] is not None)} is empty")
        for name, spec in self.inputs.items():  # zeros where a modality is missing: the model ignores them
            if name not in out and name != "available":
                out[name] = np.zeros(spec["shape"][1:], spec["dtype"])
        out["available"] = np.array(available, bool)
        return out

    def predict(self, samples: list[dict]) -> list[dict]:
        """Answers for a batch of samples (each a ``features()`` dict), in the terms of the model's target
        (manifest.json: target; the pipeline's mmpipe/targets, which export checks this against):
        a class {"label", "probabilities"}, a number {"value"} in the training data's units, a tag set
        {"tags", "scores"} (the tags whose probability reaches their threshold, tuned on validation data).
        Calibrated (the bundle's default): the probabilities and scores are temperature-scaled, and beside the
        answer come its conformal "prediction_set" (classes; tags: every true tag in it) or "interval" (a number;
        null for an unbounded end) at "alpha": they hold the truth with probability >= 1 - alpha."""
        feeds = {name: np.stack([s[name] for s in samples]).astype(spec["dtype"]) for name, spec in self.inputs.items()}
        outputs = self.session.run(["logits"], feeds)[0].astype(np.float64)
        return self._answers(outputs, [s["available"] for s in samples])

    def _trust(self, available: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Per row, its availability pattern's temperature and conformal threshold (None: not calibrated)."""
        if not self.calibration:
            return np.ones(len(available)), None
        patterns = ["+".join(m for m, ok in zip(self.modalities, flags) if ok) for flags in available]
        levels = self.calibration["thresholds"][f"{self.alpha:g}"]
        t = np.array([self._temperature(p) for p in patterns])
        q = np.array([np.inf if levels.get(p) is None else levels[p] for p in patterns])
        return t, q

    def _temperature(self, pattern: str) -> float:
        temperatures = (self.calibration or {}).get("temperature")
        return temperatures["patterns"].get(pattern, temperatures["global"]) if temperatures else 1.0

    @staticmethod
    def _probabilities(outputs: np.ndarray, t, kind: str) -> np.ndarray:
        """Tag probabilities (sigmoid) or class probabilities (softmax) of logits at temperature ``t``."""
        z = outputs / t
        if kind == "set":
            return 1.0 / (1.0 + np.exp(-z))
        probs = np.exp(z - z.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)

    def _answers(self, outputs: np.ndarray, available: list[np.ndarray]) -> list[dict]:
        target = self.manifest.get("target") or {"type": "category"}
        state = target.get("state", {})
        t, q = self._trust(available)
        extra: list[dict] = [{} for _ in outputs]
        if target["type"] == "number":  # standardised (transformed) value -> the user's units
            def decode(z: np.ndarray) -> np.ndarray:
                values = z * state["std"] + state["mean"]
                return np.expm1(values) if state.get("transform") == "log" else values
            values = decode(outputs[:, 0])
            if q is not None:
                with np.errstate(over="ignore", invalid="ignore"):
                    low, high = decode(outputs[:, 0] - q), decode(outputs[:, 0] + q)
                extra = [{"interval": [float(lo) if np.isfinite(lo) else None, float(hi) if np.isfinite(hi) else None],
                          "alpha": self.alpha} for lo, hi in zip(low, high)]
            return [{"value": float(v)} | e for v, e in zip(values, extra)]
        names = state["tags"] if target["type"] == "set" else self.manifest["labels"]
        probs = self._probabilities(outputs, t[:, None], target["type"])
        if target["type"] == "set":
            # the tags answered: the tuned thresholds on the uncalibrated probabilities (a temperature changes none)
            answered = self._probabilities(outputs, 1.0, "set") >= np.asarray(state["thresholds"])[None, :]
            answers = [{"tags": [n for n, on in zip(names, row) if on],
                        "scores": {n: round(float(p), 6) for n, p in zip(names, prob)}} for row, prob in zip(answered, probs)]
        else:
            answers = [{"label": names[int(p.argmax())], "probabilities": {n: round(float(x), 6) for n, x in zip(names, p)}}
                       for p in probs]
        if q is not None:  # 1e-9: a row scored exactly at the threshold is in its set despite float rounding
            inside = probs >= 1.0 - q[:, None] - 1e-9
            extra = [{"prediction_set": [n for n, on in zip(names, row) if on], "alpha": self.alpha} for row in inside]
        return [a | e for a, e in zip(answers, extra)]

    # ------------------------------------------------------------------ drift monitor

    def statistics(self, feeds: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        """The drift monitor's per-row statistics of a batch of model inputs (``features()`` dicts stacked, or
        the pipeline's feature arrays): {"<modality>.<statistic>": (kind, values; NaN where the row lacks the
        modality)} — each modality's own (its input class's ``statistics``), whether it is there, and what the
        model makes of it alone (its confidence with only that modality: the encoder's embedding as the head
        reads it; a number: the value)."""
        available = np.asarray(feeds["available"], bool)
        n, out = len(available), {}
        for j, m in enumerate(self.modalities):
            out[f"{m}.available"] = ("categorical", available[:, j].astype(np.float64))
            rows = np.flatnonzero(available[:, j])
            if not len(rows):
                continue
            reader = self.readers[m]
            for name, (kind, values) in reader.statistics({a: feeds[a][rows] for a in reader.arrays}).items():
                full = np.full(n, np.nan)
                full[rows] = values
                out[f"{m}.{name}"] = (kind, full)
            alone = np.zeros_like(available)
            alone[rows, j] = True
            sub = {name: np.asarray(v)[rows] for name, v in feeds.items() if name in self.inputs}
            sub["available"] = alone[rows]
            outputs = self.session.run(["logits"], {k: v.astype(self.inputs[k]["dtype"]) for k, v in sub.items()})[0]
            confidence = np.full(n, np.nan)
            confidence[rows] = self._confidence(outputs.astype(np.float64), m)
            out[f"{m}.model"] = ("numeric", confidence)
        return out

    def _confidence(self, outputs: np.ndarray, pattern: str) -> np.ndarray:
        target = self.manifest.get("target") or {"type": "category"}
        if target["type"] == "number":
            return outputs[:, 0]
        probs = self._probabilities(outputs, self._temperature(pattern), target["type"])
        return probs.mean(axis=1) if target["type"] == "set" else probs.max(axis=1)

    def monitor(self, rows: Iterable[dict | InputError]) -> dict:
        """A window of rows (``predict_rows``' raw inputs) against the training data (manifest.json: monitor; its
        reference file): {"drifted", the drifted "modality" and "statistic", its "score" vs the "threshold", every
        statistic's score, rows read and unreadable}. The false-alarm rate on windows of the training data's kind
        is the manifest's ``monitor.false_alarm_measured``."""
        import drift  # shipped beside this file (mmpipe/trust/drift.py)

        spec = self.manifest.get("monitor")
        if not spec:
            raise InputError("this bundle has no drift reference (built before the monitor: re-run export)")
        reference = json.loads((self.folder / spec["file"]).read_text())
        ready, unreadable = [], 0
        for row in rows:
            try:
                if isinstance(row, InputError):
                    raise row
                ready.append(self.features(**row))
            except InputError:
                unreadable += 1
        if not ready:
            return {"drifted": False, "judged": False, "why": "no readable row", "rows": 0, "unreadable_rows": unreadable}
        feeds = {name: np.stack([r[name] for r in ready]) for name in self.inputs}
        stats = {name: values for name, (_, values) in self.statistics(feeds).items()}
        return drift.score(reference, stats) | {"rows": len(ready), "unreadable_rows": unreadable,
                                                "window_rows_calibrated": reference["window_rows"]}

    def explain(self, sample: dict) -> dict:
        """How much each modality of one sample (a ``features()`` dict) moved its answer: the model run with every
        subset of the modalities the sample has (2^k - 1 passes, k <= 6), exact Shapley values of the answer's
        score (a class: its probability; a number: its value; tags: the mean score of the tags answered, or of
        the top tag) from "nothing" (the model with no input) to all of them."""
        import attribution  # shipped beside this file (mmpipe/trust/attribution.py)

        have = [m for m, ok in zip(self.modalities, sample["available"]) if ok]
        if len(have) > 6:
            raise InputError(f"--explain takes at most 6 modalities (this sample has {len(have)})")
        subsets = [frozenset(c) for k in range(len(have) + 1) for c in itertools.combinations(have, k)]
        rows = [dict(sample, available=np.array([m in s for m in self.modalities], bool)) for s in subsets]
        feeds = {name: np.stack([r[name] for r in rows]).astype(spec["dtype"]) for name, spec in self.inputs.items()}
        answers = self._answers(self.session.run(["logits"], feeds)[0].astype(np.float64), [r["available"] for r in rows])
        full = answers[-1]
        if "label" in full:
            what, values = f"probability of {full['label']!r}", [a["probabilities"][full["label"]] for a in answers]
        elif "value" in full:
            what, values = "predicted value", [a["value"] for a in answers]
        else:
            tags = full["tags"] or [max(full["scores"], key=full["scores"].get)]
            what, values = f"mean score of {', '.join(tags)}", [float(np.mean([a["scores"][g] for g in tags])) for a in answers]
        game = dict(zip(subsets, values))
        return {"of": what, "shapley": {m: round(v, 6) for m, v in attribution.shapley(have, game).items()},
                "none": game[frozenset()],
                "all": game[frozenset(have)], "subsets": {"+".join(m for m in have if m in s): v
                                                          for s, v in game.items() if s}}

    # ------------------------------------------------------------------ aligned embeddings (pretrain)

    def embed(self, samples: list[dict]) -> list[dict]:
        """The aligned embeddings of a batch of samples (``features()`` dicts): {"embeddings": {modality: unit
        vector} for each modality the sample has, "fused": the normalised mean of those}. Needs a bundle built
        after the pretrain stage ran (manifest.json: embed); the vectors of different modalities are comparable
        (cosine): a photo's lands near the recordings of the same content."""
        spec = self.manifest.get("embed")
        if not spec:
            raise InputError("this bundle has no aligned embeddings (pretrain.enabled was false when it was built)")
        if self._embedder is None:
            self._embedder = ort.InferenceSession(str(self.folder / spec["file"]), self._options,
                                                  providers=self.providers)
        feeds = {name: np.stack([s[name] for s in samples]).astype(self.inputs[name]["dtype"]) for name in spec["inputs"]}
        vectors = self._embedder.run(["embeddings"], feeds)[0].astype(np.float64)  # (B, modalities, dim), unit rows
        out = []
        for row, sample in zip(vectors, samples):
            have = [k for k, ok in enumerate(sample["available"]) if ok]
            fused = row[have].mean(axis=0)
            fused /= max(float(np.linalg.norm(fused)), 1e-12)
            out.append({"embeddings": {spec["modalities"][k]: [round(float(v), 6) for v in row[k]] for k in have},
                        "fused": [round(float(v), 6) for v in fused]})
        return out

    def predict_rows(self, rows: Iterable[dict | InputError], batch_size: int | None = None,
                     explain: bool = False, embed: bool = False) -> Iterator[dict]:
        """Rows of raw inputs (``features``' keyword arguments, any of them None; or the InputError met
        while reading that row) -> one result per row, in order: the answer (``predict``; ``embed``: the aligned
        embeddings instead, ``embed``) or {"error"}. Rows are turned into features and predicted ``batch_size`` at a
        time, so memory stays bounded however many rows come."""
        rows = iter(rows)
        while chunk := list(itertools.islice(rows, batch_size or self.serving["batch_size"])):
            results: list[dict] = []
            ready: list[tuple[int, dict]] = []
            for row in chunk:
                try:
                    if isinstance(row, InputError):
                        raise row
                    ready.append((len(results), self.features(**row)))
                    results.append({})
                except InputError as exc:
                    results.append({"error": str(exc)})
            if ready:
                answer = self.embed if embed else self.predict
                for (i, features), prediction in zip(ready, answer([f for _, f in ready])):
                    results[i] = prediction | ({"explanation": self.explain(features)} if explain else {})
            yield from results


def read_file(path: str | None, base: Path, max_bytes: int) -> bytes | None:
    """A file named on the command line or in a manifest: a regular file of at most ``max_bytes``."""
    if not path:
        return None
    file = Path(path) if Path(path).is_absolute() else base / path
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        with os.fdopen(os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)), "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InputError(f"{path}: not a regular file")
            if info.st_size > max_bytes:
                raise InputError(f"{path}: {info.st_size:,} bytes > the bundle's limit of {max_bytes:,} bytes per input")
            data = fh.read(max_bytes + 1)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise InputError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if len(data) > max_bytes:
        raise InputError(f"{path}: more than the bundle's limit of {max_bytes:,} bytes per input")
    return data


def row_inputs(row: dict, columns: dict[str, tuple[str, str]], base: Path, max_bytes: int) -> dict:
    """One manifest row -> raw inputs keyed by modality (``Predictor.request_columns``: which column
    feeds which modality, and how)."""
    given: dict = {}
    for column, (modality, kind) in columns.items():
        value = row.get(column)
        if value in (None, ""):
            continue
        if kind == "file":
            given[modality] = read_file(value, base, max_bytes)
        elif kind == "string":
            given[modality] = value
        else:
            given.setdefault(modality, {})[column] = value
    return given


def manifest_rows(path: str, columns: dict[str, tuple[str, str]], max_bytes: int) -> Iterator[tuple[dict, dict | InputError]]:
    """(identity, raw inputs or the InputError of that row) for each row of a CSV manifest, read lazily.
    A manifest that cannot be read at all raises InputError here, before any row."""
    csv.field_size_limit(2**31 - 1)  # long text cells are judged by clean.text.max_bytes, not by the CSV reader
    fh = None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))  # a FIFO: no wait for a writer
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"{path}: not a regular file")
        # invalid UTF-8 is carried as surrogates so that only the row holding it is an error
        fh = open(fd, newline="", encoding="utf-8-sig", errors="surrogateescape")
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
    except InputError:
        raise
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        if fh is not None:
            fh.close()
        raise InputError(f"{path}: not a readable CSV file ({getattr(exc, 'strerror', None) or exc})") from None
    if not header & set(columns):
        fh.close()
        raise InputError(f"{path}: needs at least one of the columns {', '.join(columns)}")
    return _rows(fh, reader, path, Path(path).resolve().parent, columns, max_bytes)


def _rows(fh, reader: csv.DictReader, path: str, base: Path, columns: dict[str, tuple[str, str]],
          max_bytes: int) -> Iterator[tuple[dict, dict | InputError]]:
    with fh:
        for number in itertools.count(1):
            ident = {"row": number}
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # one bad line is that row's error
                yield ident, InputError(f"{path}: row {number}: not readable as CSV ({exc})")
                continue
            # (an invalid byte is a surrogate here, which printable() shows as an escape)
            bad = next((c for c, v in row.items() if isinstance(v, str) and portable.printable(v) != v), None)
            if bad is not None:
                yield ident, InputError(f"{path}: row {number}: column {portable.printable(bad)!r} is not valid UTF-8")
                continue
            if row.get("id"):
                ident["id"] = row["id"]
            try:
                yield ident, row_inputs(row, columns, base, max_bytes)
            except InputError as exc:
                yield ident, exc


def write_index(results: Iterable[tuple[dict, dict]], modalities: list[str], path: str) -> dict:
    """Embeddings of a collection ((identity, ``embed`` result or error) per row) saved as one .npz index (numpy
    only): ids, availability (rows, modalities), per-modality vectors (rows, modalities, dim; zeros where
    missing) and the fused vectors. Rows that could not be read are counted, not indexed."""
    ids, available, vectors, fused, errors = [], [], [], [], 0
    for ident, result in results:
        if "error" in result:
            errors += 1
            continue
        dim = len(result["fused"])
        ids.append(str(ident.get("id", ident.get("row", len(ids) + 1))))
        available.append([m in result["embeddings"] for m in modalities])
        vectors.append([result["embeddings"].get(m, [0.0] * dim) for m in modalities])
        fused.append(result["fused"])
    if not ids:
        raise InputError("no row could be embedded: nothing to index")
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # written whole, then renamed: never half an index
    np.savez(tmp, ids=np.array(ids), modalities=np.array(modalities), available=np.array(available, bool),
             vectors=np.array(vectors, np.float32), fused=np.array(fused, np.float32))
    os.replace(tmp, path)
    return {"index": path, "rows": len(ids), "unreadable_rows": errors}


def search_index(path: str, among: str, k: int):
    """A function answering one ``embed`` result with the ``k`` rows of the index at ``path`` whose ``among``
    vector (a modality's, or "fused") is most similar to the query's fused vector: {"matches": [{"id",
    "similarity"}]}. The index is read as arrays only (no pickle)."""
    import retrieval  # shipped beside this file (mmpipe/pretrain/retrieval.py)

    try:
        with np.load(path, allow_pickle=False) as index:
            ids, modalities = index["ids"], [str(m) for m in index["modalities"]]
            if among == "fused":
                gallery, rows = index["fused"], np.arange(len(ids))
            elif among in modalities:
                rows = np.flatnonzero(index["available"][:, modalities.index(among)])
                gallery = index["vectors"][rows, modalities.index(among)]
            else:
                raise InputError(f"--among {among}: the index has {', '.join(modalities)} and fused")
    except InputError:
        raise
    except Exception as exc:  # a missing file, not a zip, a missing array: any of them is one line
        raise InputError(f"{path}: not an index written by --index ({portable.describe(exc)})") from None

    def answer(result: dict) -> dict:
        positions, scores = retrieval.search(gallery, np.array(result["fused"], np.float32), k)
        return {"matches": [{"id": str(ids[rows[p]]), "similarity": round(float(s), 6)}
                            for p, s in zip(positions[0], scores[0])]}
    return answer


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def cli_input(kind: str, value: str, max_bytes: int):
    """A command-line value as a raw input: a file's bytes, the text itself, or a JSON object."""
    if kind == "file":
        return read_file(value, Path.cwd(), max_bytes)
    if kind == "string":
        return value
    try:
        return portable.json_object(value)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict the class of one sample or of a manifest of samples.")
    parser.add_argument("--model", default="shipped", help="shipped (default), fp32, or fp16 (for a GPU: --device cuda)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="conformal level of the prediction sets/intervals (1 - alpha: how often they hold the "
                             "truth); one of the levels the bundle calibrated (default: its own)")
    parser.add_argument("--explain", action="store_true",
                        help="add each modality's Shapley contribution to the answer (2^k - 1 more model runs per row)")
    parser.add_argument("--monitor", metavar="WINDOW_CSV",
                        help="score a window of rows (a manifest) against the training data: which modality drifted; "
                             "exit status 1 when it has")
    parser.add_argument("--embed", action="store_true",
                        help="answer with the aligned embedding of each modality given and a fused one (not a prediction)")
    parser.add_argument("--index", metavar="OUT_NPZ", help="embed every row of --manifest into this index (for --search)")
    parser.add_argument("--search", metavar="INDEX_NPZ", help="the rows of this index most similar to each input")
    parser.add_argument("--among", default="fused",
                        help="--search: compare with the index's vectors of this modality, or fused (default)")
    parser.add_argument("--k", type=_positive, default=10, help="--search: matches per input (default 10)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="cpu (default); cuda: ONNX Runtime's CUDA execution provider (onnxruntime-gpu); "
                             "auto: CUDA when available")
    known, _ = parser.parse_known_args(argv)
    models = json.loads((HERE / "manifest.json").read_text())["models"]
    if known.model not in models:
        parser.error(f"argument --model: {known.model!r} is not a model of this bundle (choose from {', '.join(models)})")
    try:
        providers(known.device)
    except ValueError as exc:
        parser.error(f"argument --device: {exc}")
    try:
        predictor = Predictor(model=known.model, alpha=known.alpha, device=known.device)
    except ValueError as exc:
        parser.error(f"argument --alpha: {exc}")
    helps = {"file": "file (path)", "string": "the string itself", "record": "a JSON object of its fields"}
    for m, reader in predictor.readers.items():
        parser.add_argument(f"--{m}", help=f"{m}: {helps[reader.KIND]}")
    columns = predictor.request_columns()
    parser.add_argument("--manifest", help=f"CSV with the columns {', '.join(columns)} (any of them) and optional id")
    parser.add_argument("--batch-size", type=_positive, default=None, help="rows predicted at a time")
    args = parser.parse_args(argv)
    max_bytes = predictor.serving["max_item_bytes"]

    if args.monitor:
        try:
            report = predictor.monitor(row for _, row in manifest_rows(args.monitor, columns, max_bytes))
        except InputError as exc:
            print(json.dumps({"error": str(exc)}, ensure_ascii=False))
            return 2
        print(json.dumps(report, ensure_ascii=False))
        return 1 if report["drifted"] else 0
    if args.index and not args.manifest:
        parser.error("--index needs --manifest (the rows to embed)")
    if args.manifest:
        try:
            pairs = manifest_rows(args.manifest, columns, max_bytes)
        except InputError as exc:  # the manifest itself cannot be read
            print(json.dumps({"error": str(exc)}, ensure_ascii=False))
            return 1
    else:
        given = {m: getattr(args, m) for m in predictor.modalities if getattr(args, m) is not None}
        if not given:
            parser.error("give " + ", ".join(f"--{m}" for m in predictor.modalities) + " (any of them), or --manifest")
        try:
            single: dict | InputError = {m: cli_input(predictor.readers[m].KIND, value, max_bytes)
                                         for m, value in given.items()}
        except InputError as exc:
            single = exc
        pairs = iter([({}, single)])
    failed = False
    idents: collections.deque[dict] = collections.deque()  # of the rows read but not yet printed

    def inputs() -> Iterator[dict | InputError]:
        for ident, row in pairs:
            idents.append(ident)
            yield row

    embed = args.embed or bool(args.index) or bool(args.search)
    try:
        if embed and not predictor.manifest.get("embed"):
            raise InputError("this bundle has no aligned embeddings (pretrain.enabled was false when it was built)")
        searched = search_index(args.search, args.among, args.k) if args.search else None
        results = predictor.predict_rows(inputs(), args.batch_size, explain=args.explain, embed=embed)
        if args.index:
            print(json.dumps(write_index(((idents.popleft(), r) for r in results), predictor.modalities, args.index)))
            return 0
    except InputError as exc:
        print(json.dumps({"error": str(exc)}, ensure_ascii=False))
        return 2
    for result in results:
        failed |= "error" in result
        if searched is not None and "error" not in result:
            result = searched(result)
        print(json.dumps(idents.popleft() | result, ensure_ascii=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
