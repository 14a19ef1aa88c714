"""Naive per-file / per-sample baselines the benchmarks compare against (and the parity tests use).

They are written the way a first script usually is: one file at a time, one sample at a time.
"""

from __future__ import annotations

import io
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
from PIL import Image

from mmpipe.modalities import logmel


def audio_file_features(path: Path, out: Path, sample_rate: int, cfg) -> None:
    """librosa.load + librosa.feature.melspectrogram + np.save, for one file."""
    y, _ = librosa.load(path, sr=sample_rate)
    y = librosa.util.fix_length(y, size=int(round(cfg.seconds * sample_rate)))
    mel = librosa.feature.melspectrogram(y=y, sr=sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop,
                                         n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    np.save(out, np.log(mel + logmel.EPS).astype(np.float16))


def image_file_features(path: Path, out: Path, cfg) -> None:
    """PIL open + resize + np.save, for one file (square inputs: no padding or cropping needed)."""
    img = Image.open(path).convert("L" if cfg.mode == "grayscale" else "RGB")
    img = img.resize((cfg.size, cfg.size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    np.save(out, arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


class RawBytesDataset(torch.utils.data.Dataset):
    """Decodes every modality from the clean rows' bytes in ``__getitem__``."""

    def __init__(self, rows: list[dict], labels: list[str], cfg, sample_rate: int, tokenizer):
        self.rows, self.cfg, self.sample_rate, self.tokenizer = rows, cfg, sample_rate, tokenizer
        self.label_index = {label: i for i, label in enumerate(labels)}
        self.n_samples = int(round(cfg.audio.seconds * sample_rate))
        self.n_frames = logmel.frames(self.n_samples, cfg.audio.n_fft, cfg.audio.hop)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row, cfg = self.rows[i], self.cfg
        image = torch.zeros(3, cfg.image.size, cfg.image.size, dtype=torch.uint8)
        if row["image_available"]:
            img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((cfg.image.size,) * 2)
            image = torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
        audio = torch.zeros(cfg.audio.n_mels, self.n_frames, dtype=torch.float16)
        if row["audio_available"]:
            y, _ = sf.read(io.BytesIO(row["audio"]), dtype="float32")
            y = librosa.util.fix_length(y, size=self.n_samples)
            mel = librosa.feature.melspectrogram(y=y, sr=self.sample_rate, n_fft=cfg.audio.n_fft,
                                                 hop_length=cfg.audio.hop, n_mels=cfg.audio.n_mels,
                                                 fmin=cfg.audio.fmin, fmax=cfg.audio.fmax)
            audio = torch.from_numpy(np.log(mel + logmel.EPS).astype(np.float16))
        ids, lengths = self.tokenizer.encode([row["text"] if row["text_available"] else None])
        return {"image": image, "audio": audio, "text": torch.from_numpy(ids[0]),
                "text_length": torch.tensor(lengths[0]), "label": torch.tensor(self.label_index[row["label"]]),
                "available": torch.tensor([row["image_available"], row["text_available"], row["audio_available"]])}
