"""Audio modality: its params, validation and normalisation (clean), log-mel features (preprocess),
corruptions for the robustness sweep (evaluate), its encoder and its predictor input."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Callable, Literal

import numpy as np
import pyarrow as pa
import soundfile as sf
import soxr
from pydantic import Field, model_validator

from mmpipe.errors import PipelineError
from mmpipe.modalities import inputs, logmel
from mmpipe.modalities.base import Cleaned
from mmpipe.modalities.portable import decode_audio, describe, fix_length, to_pcm16
from mmpipe.schema import Backbone, Embeddable, Strict

NAME = "audio"
EXTENSIONS = (".wav", ".flac")
# How clean stores the normalised content, and which facts of clean's info it keeps as columns.
STORED_AS = pa.binary()
INFO_COLUMNS = {"seconds": pa.float32()}
INLINE = False
PREDICTOR_INPUT = (Path(inputs.__file__), "AudioInput")


# --------------------------------------------------------------------------- params


class Clean(Strict):
    sample_rate: int = Field(16000, ge=4000, le=192000)
    min_seconds: float = Field(0.1, ge=0.0)
    max_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    silence_dbfs: float = Field(-60.0, le=0.0)
    min_rate: int = Field(4000, ge=1)
    max_rate: int = Field(384000, ge=1, le=1_000_000)
    max_channels: int = Field(16, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> "Clean":
        self.check_order(("min_seconds", "max_seconds"), ("min_rate", "max_rate"))
        return self


class Preprocess(Embeddable):
    # logmel: float16 log-mel spectrograms (small_cnn) | waveform: the float16 clip itself (torchaudio's
    # self-supervised encoders take 16 kHz waveforms)
    features: Literal["logmel", "waveform"] = "logmel"
    # auto: the train clips' 99th-percentile duration, rounded up to 0.5 s, within AUTO_SECONDS (resolve_preprocess)
    seconds: Annotated[float, Field(gt=0.0, le=600.0)] | Literal["auto"] = "auto"
    n_mels: int = Field(64, ge=1, le=512)
    n_fft: int = Field(512, ge=16, le=16384)
    hop: int = Field(160, ge=1)
    fmin: float = Field(20.0, ge=0.0)
    fmax: float = Field(8000.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> "Preprocess":
        self.check_order(("fmin", "fmax"), strict=True)
        self.check_order(("hop", "n_fft"))
        return self


# ``seconds: auto``: the clip length that leaves 99 % of the train clips whole, rounded up to 0.5 s (the
# built-in corpus: 1.5), within these bounds — frames, memory and compute grow with the length, and a
# longer recording's label rarely needs more than its first 10 s
AUTO_SECONDS = (0.5, 10.0)


def resolve_preprocess(cfg: Preprocess, encoder, train_info: dict) -> tuple[Preprocess, dict]:
    """``seconds: auto`` -> the train clips' 99th-percentile duration rounded up to 0.5 s, within AUTO_SECONDS."""
    if cfg.seconds != "auto":
        return cfg, {}
    durations = np.asarray(train_info.get("seconds", []), dtype=np.float64)
    if not len(durations):
        raise PipelineError(f"preprocess.{NAME}.seconds: auto reads the train split's clip durations, and it has no "
                            f"clip; set a number of seconds")
    p99 = float(np.quantile(durations, 0.99))
    seconds = float(min(max(np.ceil(p99 * 2) / 2, AUTO_SECONDS[0]), AUTO_SECONDS[1]))
    cut = float(np.mean(durations > seconds + 1e-9))
    return cfg.model_copy(update={"seconds": seconds}), {"seconds": {
        "value": seconds, "why": f"99th-percentile duration of {len(durations):,} train clips: {p99:.2f} s, rounded up "
                                 f"to 0.5 s within {AUTO_SECONDS[0]:g}..{AUTO_SECONDS[1]:g}; {100 * cut:.1f} % of "
                                 f"them are cut"}}


class Encoder(Backbone):
    # arch: small_cnn (SpectrogramCNN over the log-mel) or a torchaudio speech encoder by builder name:
    # wav2vec2_base, hubert_base, wavlm_base, ... (mmpipe/models/backbones.py); weights: a local state dict
    width: int = Field(16, ge=4, le=512)  # small_cnn only
    normalize: bool | None = None  # standardise each clip first; null = as torchaudio's pretrained bundle does
    options: dict[str, Any] = Field(default_factory=dict)  # builder keyword arguments (wav2vec2_model's config)


PARAMS = {"clean": Clean, "preprocess": Preprocess, "model": Encoder}

# the encoder's width under each preset (params.PRESETS; balanced = the schema default)
PRESETS = {"quick": {"model": {"width": 8}}, "balanced": {"model": {"width": 16}},
           "best": {"model": {"width": 24}}}


def describe_rules(rules: dict) -> str:
    return (f"audio (WAV, FLAC, …) of {rules['min_seconds']:g}–{rules['max_seconds']:g} s, {rules['min_rate']:,}–"
            f"{rules['max_rate']:,} Hz, at most {rules['max_channels']} channels, not silent; converted to mono "
            f"{rules['sample_rate']:,} Hz")


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
    """Mono float samples -> PCM16 WAV bytes (the integer conversion is portable.to_pcm16's)."""
    out = io.BytesIO()
    sf.write(out, to_pcm16(samples), sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def clean(data: bytes, cfg) -> Cleaned:
    """Decode under clean.audio's bounds (portable.decode_audio: empty, NaN, silent and out-of-bounds
    clips rejected), convert to mono PCM16 WAV at cfg.sample_rate (kept as is when it already is)."""
    mono, facts = decode_audio(data, cfg.model_dump())
    info = {k: facts[k] for k in ("seconds", "original_rate", "original_channels", "original_format")}
    if facts["original_format"] == "WAV/PCM_16" and facts["original_channels"] == 1 \
            and facts["original_rate"] == cfg.sample_rate:
        return Cleaned(data, converted=False, info=info)
    return Cleaned(encode_wav(mono, cfg.sample_rate), converted=True, info=info)


# --------------------------------------------------------------------------- features (preprocess)


class Features:
    """Clean audio -> a fixed-length clip's float16 log-mel (n_mels, frames) with per-mel-bin mean/std from
    train (``features: logmel``), or the float16 clip itself (``features: waveform``)."""

    gpu = True  # the log-mel batches well on a GPU (same formulas, logmel.log_mel_torch)
    chunk = 8  # rows per log-mel call: keeps the frame arrays in cache (measured fastest)

    def __init__(self, cfg, dataset: dict):
        self.cfg = cfg
        self.sample_rate = int(dataset["clean_rules"][NAME]["sample_rate"])
        self.n_samples = int(round(cfg.seconds * self.sample_rate))
        self.kind = cfg.features
        if self.kind == "waveform":
            self.mel_filters = None
            self.arrays = {NAME: ((self.n_samples,), np.float16)}
            self.stats = None  # the encoder normalises (or not) as its pretraining did
            return
        if cfg.fmax > self.sample_rate / 2:
            raise PipelineError(f"params.yaml: preprocess.audio.fmax={cfg.fmax} exceeds half the sample rate "
                                f"({self.sample_rate / 2:g} Hz, clean.audio.sample_rate)")
        self.mel_filters = logmel.mel_filters(self.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
        n_frames = logmel.frames(self.n_samples, cfg.n_fft, cfg.hop)
        self.arrays = {NAME: ((cfg.n_mels, n_frames), np.float16)}
        self.stats = (NAME, (0, 2), 1.0)

    def fit(self, train_values: list) -> None:
        pass  # the mean/std are preprocess's running statistics (``stats``)

    def waveforms(self, items: list[bytes | None], ids: list[str],
                  errors: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (B, n_samples) float32 clips and a (B,) mask of the present ones (an item that does not
        decode is recorded in ``errors``, position -> reason, and left out of the mask)."""
        batch = np.zeros((len(items), self.n_samples), np.float32)
        present = np.zeros(len(items), bool)
        for i, data in enumerate(items):
            if data is None:
                continue
            try:
                decoded = pcm16_wav(data)
                if decoded is None:
                    clip, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
                    decoded = clip.mean(axis=1), rate
            except Exception as exc:
                errors[i] = f"audio does not decode: {describe(exc)}"
                continue
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
        cfg = SimpleNamespace(**{k: state[k] for k in ("seconds", "n_fft", "hop", "n_mels", "fmin", "fmax")},
                              features=state.get("features", "logmel"))
        features = cls(cfg, {"clean_rules": {NAME: {"sample_rate": state["sample_rate"]}}})
        if features.kind == "logmel":
            features.mel_filters = np.load(Path(folder) / state["mel_filters"])
        return features

    def transform(self, items: list[bytes | None], ids: list[str],
                  noise: Callable[[np.ndarray], np.ndarray] | None = None,
                  *, errors: dict[int, str], device: str = "cpu") -> dict[str, np.ndarray]:
        """``noise`` (evaluate's robustness sweep) maps the (n, n_samples) float32 clips of the present items."""
        batch, present = self.waveforms(items, ids, errors)
        if noise is not None and present.any():
            batch[present] = noise(batch[present])
        out = np.zeros((len(items), *self.arrays[NAME][0]), np.float16)
        if self.kind == "waveform":
            out[present] = batch[present].astype(np.float16)
        elif present.any():
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
        state = {"features": self.kind, "sample_rate": self.sample_rate, "seconds": self.cfg.seconds,
                 "n_samples": self.n_samples, "n_fft": self.cfg.n_fft, "hop": self.cfg.hop, "n_mels": self.cfg.n_mels,
                 "fmin": self.cfg.fmin, "fmax": self.cfg.fmax}
        if self.kind == "logmel":
            state.update(log_eps=logmel.EPS, mel_filters="mel_filters.npy")
        return state

    def save(self, folder) -> None:
        if self.mel_filters is not None:
            np.save(folder / "mel_filters.npy", self.mel_filters)

    @staticmethod
    def state_files(state: dict) -> list[str]:
        return [state["mel_filters"]] if "mel_filters" in state else []


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


# --------------------------------------------------------------------------- train/serve parity (export)

# Rates and encodings recordings usually come in (rate -> soundfile format, subtype).
PARITY_RATES = {22050: ("FLAC", "PCM_16"), 44100: ("WAV", "PCM_16"), 48000: ("WAV", "PCM_24")}


def as_recording(raw: bytes, rate: int) -> bytes:
    """A raw clip as a typical recording: resampled to ``rate`` (soxr, very high quality), stereo
    (right channel at half the gain), encoded as PARITY_RATES says."""
    samples, source_rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    mono = soxr.resample(samples.mean(axis=1), source_rate, rate, quality="VHQ")
    fmt, subtype = PARITY_RATES[rate]
    out = io.BytesIO()
    sf.write(out, np.clip(np.stack([mono, 0.5 * mono], axis=1), -1.0, 1.0), rate, format=fmt, subtype=subtype)
    return out.getvalue()


# Re-encodings of a raw item users commonly bring: export checks that the bundle's predictor and the
# pipeline (clean -> preprocess) give the model the same input for them (optional in a modality).
PARITY_VARIANTS = {f"{rate / 1000:g} kHz stereo": (lambda raw, rate=rate: as_recording(raw, rate)) for rate in PARITY_RATES}


# --------------------------------------------------------------------------- encoder (train)


def build_encoder(state: dict, cfg: Encoder, model):
    kind = state.get("features", "logmel")
    if cfg.arch != "small_cnn":
        from mmpipe.models.backbones import TorchaudioEncoder

        if kind != "waveform":
            raise PipelineError(f"model.encoders.{NAME}.arch {cfg.arch} reads waveforms: set "
                                f"preprocess.{NAME}.features: waveform (now {kind})")
        return TorchaudioEncoder(NAME, cfg.arch, state["sample_rate"], state["n_samples"], model.dim, cfg.weights,
                                 cfg.freeze, cfg.lr_scale, cfg.normalize, cfg.options, cfg.checkpointing)
    if kind != "logmel":
        raise PipelineError(f"model.encoders.{NAME}.arch small_cnn reads log-mel spectrograms: set preprocess.{NAME}"
                            f".features: logmel, or choose a waveform arch such as wav2vec2_base (now {kind})")
    from mmpipe.models.encoders import SpectrogramCNN  # torch only where a model is built

    return SpectrogramCNN(state["mean"], state["std"], model.dim, cfg.width, model.augment)
