#!/usr/bin/env python3
"""Standalone predictor of the deployment bundle: raw image / audio files and text in, JSON out.

Needs only numpy, onnxruntime, soundfile and pillow (requirements.txt next to this file) and the
files of this folder. Any modality may be left out.

    python predict.py --image digit.png --audio digit.wav --text "seven"
    python predict.py --manifest samples.csv      # columns image, audio, text (and optional id);
                                                  # paths relative to the CSV; one JSON line per row
    python predict.py ... --model fp32            # the fp32 model instead of the shipped one

A row whose input cannot be read prints {"error": ...} for that row; the other rows are still
predicted; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf
from PIL import Image, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the shipped helper modules next to this file

import logmel  # noqa: E402
import portable  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


class InputError(Exception):
    """An input that cannot be turned into features (the message names the reason)."""


class Predictor:
    def __init__(self, folder: Path = HERE, model: str = "shipped", threads: int = 0):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        file = self.manifest["models"][model]["file"]
        self.session = ort.InferenceSession(str(self.folder / file), options, providers=["CPUExecutionProvider"])
        self.inputs = {i["name"]: i for i in self.manifest["inputs"]}
        self.modalities = self.manifest["modalities"]
        pre = self.manifest["preprocessing"]
        self.image, self.text, self.audio = pre.get("image"), pre.get("text"), pre.get("audio")
        if self.text:
            self.tokenizer = Tokenizer.load(self.folder / self.text["tokenizer"])
        if self.audio:
            self.mel_filters = np.load(self.folder / self.audio["mel_filters"])

    # ------------------------------------------------------------------ one modality each: raw -> features

    def image_features(self, data: bytes) -> dict[str, np.ndarray]:
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"image does not decode: {exc}") from None
        normalized, changed = portable.normalize_image(img)
        source = data if fmt in portable.PASS_THROUGH_FORMATS and not changed else normalized
        cfg = self.image
        return {"image": portable.load_pixels(source, cfg["size"], cfg["mode"], cfg["fit"])}

    def text_features(self, text: str | bytes) -> dict[str, np.ndarray]:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise InputError(f"text is not valid UTF-8 (offset {exc.start})") from None
        text = portable.normalize(text)
        if not text:
            raise InputError("text is empty after normalisation")
        text = text[: self.text["max_chars"]].rstrip()
        ids, lengths = self.tokenizer.encode([text])
        return {"text": ids[0].astype(np.int64), "text_length": np.int64(lengths[0])}

    def audio_features(self, data: bytes) -> dict[str, np.ndarray]:
        cfg = self.audio
        try:
            samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"audio does not decode: {str(exc).strip() or type(exc).__name__}") from None
        if len(samples) == 0 or not np.isfinite(samples).all():
            raise InputError("audio is empty or has NaN/infinite samples")
        mono = portable.resample(samples.mean(axis=1), rate, cfg["sample_rate"])
        # clean stores 16-bit PCM; preprocess stores the log-mel as float16: reproduce both roundings
        mono = np.rint(np.clip(mono, -1.0, 1.0) * 32767.0).astype(np.float32) / 32768.0
        clip = portable.fix_length(mono, cfg["n_samples"])
        mel = logmel.log_mel(clip[None], self.mel_filters, cfg["n_fft"], cfg["hop"])[0]
        return {"audio": mel.astype(np.float16).astype(np.float32)}

    # ------------------------------------------------------------------ samples -> predictions

    def features(self, image: bytes | None = None, audio: bytes | None = None, text: str | bytes | None = None):
        """One sample's model inputs (no batch axis); modalities left out are marked unavailable."""
        given = {"image": image, "audio": audio, "text": text}
        out, available = {}, []
        for m in self.modalities:
            value = given[m]
            if value is not None:
                out |= getattr(self, f"{m}_features")(value)
            available.append(value is not None)
        for name, spec in self.inputs.items():  # zeros where a modality is missing: the model ignores them
            if name not in out and name != "available":
                out[name] = np.zeros(spec["shape"][1:], spec["dtype"])
        out["available"] = np.array(available, bool)
        return out

    def predict(self, samples: list[dict]) -> list[dict]:
        """Probabilities for a batch of samples (each a ``features()`` dict)."""
        feeds = {name: np.stack([s[name] for s in samples]).astype(spec["dtype"]) for name, spec in self.inputs.items()}
        logits = self.session.run(["logits"], feeds)[0].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        labels = self.manifest["labels"]
        return [{"label": labels[int(p.argmax())], "probabilities": {lab: round(float(x), 6) for lab, x in zip(labels, p)}}
                for p in probs]


def _read(path: str | None, base: Path) -> bytes | None:
    if not path:
        return None
    file = Path(path) if Path(path).is_absolute() else base / path
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict the class of one sample or of a manifest of samples.")
    parser.add_argument("--image", help="image file (PNG, JPEG, ...)")
    parser.add_argument("--audio", help="audio file (WAV, FLAC, ...)")
    parser.add_argument("--text", help="the text itself")
    parser.add_argument("--manifest", help="CSV with columns image, audio, text (and optional id)")
    parser.add_argument("--model", default="shipped", help="shipped (default) or fp32")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    predictor = Predictor(model=args.model)

    if args.manifest:
        base = Path(args.manifest).resolve().parent
        try:
            with open(args.manifest, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            print(json.dumps({"error": f"{args.manifest}: cannot read ({exc.strerror or exc})"}))
            return 1
        if rows and not {"image", "audio", "text"} & set(rows[0]):
            print(json.dumps({"error": f"{args.manifest}: needs at least one of the columns image, audio, text"}))
            return 1
    else:
        if not (args.image or args.audio or args.text):
            parser.error("give --image, --audio and/or --text, or --manifest")
        base, rows = Path.cwd(), [{"image": args.image, "audio": args.audio, "text": args.text}]

    results: list[dict | None] = [None] * len(rows)
    ready: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        ident = {"row": i + 1} | ({"id": row["id"]} if row.get("id") else {})
        try:
            ready.append((i, predictor.features(image=_read(row.get("image"), base), audio=_read(row.get("audio"), base),
                                                text=row.get("text") or None)))
            results[i] = ident
        except InputError as exc:
            results[i] = ident | {"error": str(exc)}
    for start in range(0, len(ready), args.batch_size):
        chunk = ready[start:start + args.batch_size]
        for (i, _), prediction in zip(chunk, predictor.predict([f for _, f in chunk])):
            results[i] |= prediction
    for result in results:
        if not args.manifest:
            result.pop("row", None)
        print(json.dumps(result, ensure_ascii=False))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
