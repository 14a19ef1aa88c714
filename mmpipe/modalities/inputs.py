"""The bundle predictor's inputs: one class per kind of modality that turns one raw input into the
model's arrays (no batch axis), exactly as clean + preprocess did. Shipped as is in the deployment
bundle next to portable.py, logmel.py and tokenizer.py; needs nothing of this package.

A modality module names its class in ``PREDICTOR_INPUT``; the bundle's manifest records it
(``preprocessing.<modality>.input``), and the predictor builds each modality's input from it with

    cls(arrays, state, rules, folder)

``arrays``: the modality's array names (in the model's order); ``state``: its fitted preprocess
state; ``rules``: clean's rules for it; ``folder``: where the state's files are. ``KIND`` says how a
raw input arrives: ``file`` (bytes: a path on the command line or in a manifest, base64 over REST),
``string`` (the text itself), ``record`` (a JSON object; in a manifest or REST request, the columns
``columns`` of the row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

if __package__:  # inside mmpipe
    from . import logmel, portable
    from .tokenizer import UNK_ID, Tokenizer
else:  # in the bundle: the helper modules sit next to this file
    import logmel  # type: ignore[no-redef]
    import portable  # type: ignore[no-redef]
    from tokenizer import UNK_ID, Tokenizer  # type: ignore[no-redef]


class Input:
    KIND = "file"

    def __init__(self, arrays: list[str], state: dict[str, Any], rules: dict[str, Any], folder: Path):
        self.arrays, self.state, self.rules, self.folder = arrays, state, rules, Path(folder)

    @property
    def columns(self) -> list[str]:
        """The manifest / request columns of a ``record`` input."""
        return []

    def features(self, value: Any) -> dict[str, np.ndarray] | None:
        """One raw input -> its arrays; None when it holds nothing usable (the modality is then
        unavailable, as clean makes it); raises ``portable.RejectedInput`` where clean rejects."""
        raise NotImplementedError

    def statistics(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        """The drift monitor's per-row statistics (drift.py) of a batch of this modality's arrays (rows that have
        it): {name: ("numeric" | "categorical", values (n,))}. Computed from the arrays the model takes, so the
        export's reference (from the train split's features) and a production window (from raw files) agree."""
        return {}


class ImageInput(Input):
    def features(self, value: bytes) -> dict[str, np.ndarray]:
        s = self.state
        # decoded once: a JPEG clean keeps as it is comes back at preprocess's draft scale, so the
        # decoded image is what preprocess starts from whether clean kept the file or converted it
        normalized, _ = portable.decode_image(value, self.rules, draft=(s["mode"], s["size"]))
        return {self.arrays[0]: portable.load_pixels(normalized, s["size"], s["mode"], s["fit"])}

    def statistics(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        # as the model sees the pixels (resized): exposure, contrast, and detail (blur, noise)
        pixels = arrays[self.arrays[0]].astype(np.float32) / 255.0
        flat = pixels.reshape(len(pixels), -1)
        detail = np.abs(np.diff(pixels, axis=-1)).reshape(len(pixels), -1).mean(axis=1)
        return {"brightness": ("numeric", flat.mean(axis=1)), "contrast": ("numeric", flat.std(axis=1)),
                "sharpness": ("numeric", detail)}


class TextInput(Input):
    KIND = "string"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.tokenizer = Tokenizer.load(self.folder / self.state["tokenizer"])

    def features(self, value: str | bytes) -> dict[str, np.ndarray]:
        text, _ = portable.decode_text(value, self.rules)
        ids, lengths = self.tokenizer.encode([text])
        return {self.arrays[0]: ids[0], self.arrays[1]: np.int64(lengths[0])}

    def statistics(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        # length, and the share of tokens the vocabulary does not know (typos, another language, new words)
        ids, lengths = arrays[self.arrays[0]], np.asarray(arrays[self.arrays[1]], np.float64).reshape(-1)
        unknown = getattr(self.tokenizer, "unk_id", UNK_ID)
        counted = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        oov = ((ids == unknown) & counted).sum(axis=1) / np.maximum(lengths, 1)
        return {"length": ("numeric", lengths), "oov_rate": ("numeric", oov)}


class AudioInput(Input):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.waveform = self.state.get("features", "logmel") == "waveform"
        if not self.waveform:
            self.mel_filters = np.load(self.folder / self.state["mel_filters"])

    def features(self, value: bytes) -> dict[str, np.ndarray]:
        s = self.state
        # decoding stops a little past what the model hears (the header's duration is checked first)
        mono, _ = portable.decode_audio(value, self.rules, keep_seconds=s["n_samples"] / self.rules["sample_rate"])
        # clean stores 16-bit PCM; preprocess stores the clip or its log-mel as float16: reproduce both roundings
        clip = portable.fix_length(portable.as_pcm16(mono), s["n_samples"])
        if self.waveform:
            return {self.arrays[0]: clip.astype(np.float16)}
        mel = logmel.log_mel(clip[None], self.mel_filters, s["n_fft"], s["hop"])[0]
        return {self.arrays[0]: mel.astype(np.float16)}

    def statistics(self, arrays: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
        # per frame, its energy (log-mel: the mean over mel bands; a waveform: log RMS of 25 ms frames); loudness
        # is their mean, and the spread between loud and quiet frames an SNR proxy (noise fills the quiet ones)
        x = arrays[self.arrays[0]].astype(np.float32)
        if self.waveform:
            frame = 400
            usable = x[:, : x.shape[1] // frame * frame].reshape(len(x), -1, frame)
            energy = np.log10(np.sqrt((usable ** 2).mean(axis=2)) + 1e-5)
        else:
            energy = x.mean(axis=1)
        return {"loudness": ("numeric", energy.mean(axis=1)),
                "dynamic_range": ("numeric", np.percentile(energy, 90, axis=1) - np.percentile(energy, 10, axis=1))}
