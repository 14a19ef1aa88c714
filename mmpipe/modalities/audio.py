"""Audio modality: validation and normalisation (clean), log-mel features (preprocess),
corruptions for the robustness sweep (evaluate)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pyarrow as pa
import soundfile as sf
import soxr

from mmpipe.errors import PipelineError, RejectedInput
from mmpipe.modalities import logmel
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import fix_length

NAME = "audio"
EXTENSIONS = (".wav", ".flac")
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.binary()
INFO_COLUMNS = {"seconds": pa.float32()}
INLINE = False


def decode(data: bytes) -> tuple[np.ndarray, int, sf._SoundFileInfo]:
    """Decode WAV/FLAC/OGG/... bytes to float32 (frames, channels)."""
    if not data:
        raise RejectedInput("audio_empty", "audio file is empty (0 bytes)")
    try:
        info = sf.info(io.BytesIO(data))
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        detail = str(exc).replace("<_io.BytesIO object>", "").strip() or type(exc).__name__
        raise RejectedInput("audio_decode_error", f"audio does not decode: {detail}") from None
    return samples, sample_rate, info


def pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """Fast path for the WAV that clean writes (PCM 16-bit, mono): (float32 samples, rate), else None.

    Parsed by hand because soundfile's virtual-file reading cost 0.36 ms per 1-second clip here,
    more than the log-mel itself; anything unusual returns None and goes through soundfile.
    """
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, rate, fmt_ok = 12, 0, False
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]
        if chunk == b"fmt ":
            tag, channels = int.from_bytes(body[0:2], "little"), int.from_bytes(body[2:4], "little")
            rate, bits = int.from_bytes(body[4:8], "little"), int.from_bytes(body[14:16], "little")
            fmt_ok = tag == 1 and channels == 1 and bits == 16
        elif chunk == b"data":
            if not fmt_ok or len(body) != size or size % 2:
                return None
            return np.frombuffer(body, "<i2").astype(np.float32) / 32768.0, rate
        pos += 8 + size + (size & 1)
    return None


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def to_mono(samples: np.ndarray, sample_rate: int, target_rate: int) -> np.ndarray:
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    if sample_rate != target_rate:
        mono = soxr.resample(mono, sample_rate, target_rate, quality="HQ")
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def clean(data: bytes, cfg) -> Cleaned:
    """Decode, reject empty/NaN/silent/out-of-bounds clips, convert to mono PCM16 WAV at cfg.sample_rate."""
    samples, sample_rate, sf_info = decode(data)
    frames = samples.shape[0]
    if frames == 0:
        raise RejectedInput("audio_empty", "audio has no samples")
    if not np.isfinite(samples).all():
        raise RejectedInput("audio_nonfinite", "audio contains NaN or infinite samples")
    seconds = frames / sample_rate
    if not cfg.min_seconds <= seconds <= cfg.max_seconds:
        raise RejectedInput(
            "audio_duration_out_of_bounds",
            f"audio lasts {seconds:.3f}s; must be within [{cfg.min_seconds}, {cfg.max_seconds}]s (clean.audio)",
        )
    mono = to_mono(samples, sample_rate, cfg.sample_rate)
    rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
    dbfs = 20.0 * np.log10(rms) if rms > 0 else -np.inf
    if dbfs < cfg.silence_dbfs:
        raise RejectedInput("audio_silent", f"audio is silent (RMS {dbfs:.1f} dBFS < clean.audio.silence_dbfs={cfg.silence_dbfs})")
    info = {"seconds": round(seconds, 6), "original_rate": sample_rate, "original_channels": sf_info.channels,
            "original_format": f"{sf_info.format}/{sf_info.subtype}"}
    already_normal = (sf_info.format == "WAV" and sf_info.subtype == "PCM_16"
                      and sf_info.channels == 1 and sample_rate == cfg.sample_rate)
    if already_normal:
        return Cleaned(data, converted=False, info=info)
    return Cleaned(encode_wav(mono, cfg.sample_rate), converted=True, info=info)


# --------------------------------------------------------------------------- features (preprocess)


class Features:
    """Clean audio -> float16 log-mel (n_mels, frames) of a fixed-length clip; per-mel-bin mean/std from train."""

    gpu = True  # the log-mel batches well on a GPU (same formulas, logmel.log_mel_torch)
    chunk = 8  # rows per log-mel call: keeps the frame arrays in cache (measured fastest)

    def __init__(self, cfg, dataset: dict):
        self.cfg = cfg
        self.sample_rate = int(dataset["audio_sample_rate"])
        if cfg.fmax > self.sample_rate / 2:
            raise PipelineError(f"params.yaml: preprocess.audio.fmax={cfg.fmax} exceeds half the sample rate "
                                f"({self.sample_rate / 2:g} Hz, clean.audio.sample_rate)")
        self.n_samples = int(round(cfg.seconds * self.sample_rate))
        self.mel_filters = logmel.mel_filters(self.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        n_frames = logmel.frames(self.n_samples, cfg.n_fft, cfg.hop)
        self.arrays = {NAME: ((cfg.n_mels, n_frames), np.float16)}
        self.stats = (NAME, (0, 2), 1.0)

    def waveforms(self, items: list[bytes | None], ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (B, n_samples) float32 clips and a (B,) mask of the present ones."""
        batch = np.zeros((len(items), self.n_samples), np.float32)
        present = np.zeros(len(items), bool)
        for i, data in enumerate(items):
            if data is None:
                continue
            decoded = pcm16_wav(data)
            if decoded is None:
                try:
                    clip, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
                    raise PipelineError(f"sample {ids[i]}: audio does not decode: {exc}") from None
                decoded = clip.mean(axis=1), rate
            clip, rate = decoded
            if rate != self.sample_rate:
                raise PipelineError(f"sample {ids[i]}: audio is at {rate} Hz, expected {self.sample_rate} Hz "
                                    f"(data/clean is inconsistent: re-run clean)")
            batch[i] = fix_length(clip, self.n_samples)
            present[i] = True
        return batch, present

    @classmethod
    def from_state(cls, folder: Path, state: dict) -> "Features":
        """The featurizer back from a preprocess output folder (same filter bank, same clip length)."""
        cfg = SimpleNamespace(**{k: state[k] for k in ("seconds", "n_fft", "hop", "n_mels", "fmin", "fmax")})
        features = cls(cfg, {"audio_sample_rate": state["sample_rate"]})
        features.mel_filters = np.load(Path(folder) / state["mel_filters"])
        return features

    def transform(self, items: list[bytes | None], ids: list[str], device: str = "cpu",
                  noise: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """``noise`` (evaluate's robustness sweep) maps the (n, n_samples) float32 clips of the present items."""
        batch, present = self.waveforms(items, ids)
        if noise is not None and present.any():
            batch[present] = noise(batch[present])
        out = np.zeros((len(items), *self.arrays[NAME][0]), np.float16)
        if present.any():
            if device == "cpu":
                clips = batch[present]
                mel = np.concatenate([logmel.log_mel(clips[i:i + self.chunk], self.mel_filters, self.cfg.n_fft,
                                                     self.cfg.hop) for i in range(0, len(clips), self.chunk)])
            else:
                import torch

                clips = torch.from_numpy(batch[present]).to(device, non_blocking=True)
                mel = logmel.log_mel_torch(clips, self.mel_filters, self.cfg.n_fft, self.cfg.hop).cpu().numpy()
            out[present] = mel.astype(np.float16)
        return {NAME: out}

    def state(self) -> dict:
        return {"sample_rate": self.sample_rate, "seconds": self.cfg.seconds, "n_samples": self.n_samples,
                "n_fft": self.cfg.n_fft, "hop": self.cfg.hop, "n_mels": self.cfg.n_mels, "fmin": self.cfg.fmin,
                "fmax": self.cfg.fmax, "log_eps": logmel.EPS, "mel_filters": "mel_filters.npy"}

    def save(self, folder) -> None:
        np.save(folder / "mel_filters.npy", self.mel_filters)


# --------------------------------------------------------------------------- corruptions (evaluate)


def white_noise(clips: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white noise at a signal-to-noise ratio falling linearly with ``level``: 30 dB at
    level 0+, -10 dB at level 1 (level 0 = unchanged). Signal power is each clip's own mean power."""
    if level <= 0:
        return clips
    snr_db = 30.0 - 40.0 * level
    power = np.mean(clips.astype(np.float64) ** 2, axis=1, keepdims=True)
    sigma = np.sqrt(power / 10 ** (snr_db / 10)).astype(np.float32)
    return clips + sigma * rng.standard_normal(clips.shape, dtype=np.float32)


CORRUPTIONS = {"white_noise": white_noise}
