"""Audio modality: validation and normalisation (clean)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import soundfile as sf
import soxr

from mmpipe.errors import RejectedInput
from mmpipe.modalities.base import Cleaned

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
