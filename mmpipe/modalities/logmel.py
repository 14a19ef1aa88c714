"""Log-mel spectrogram: the one implementation used by preprocessing and the deployment predictor.

Needs only numpy (written for the deployment bundle to ship as is); ``log_mel_torch`` computes the same
thing with torch, for preprocessing on a GPU. Conventions are librosa's defaults, so results match
``librosa.feature.melspectrogram`` (centred frames, zero padding, periodic Hann window, power 2)
with the Slaney filter bank of ``librosa.filters.mel`` (``mel_filters`` below gives the same numbers).
"""

from __future__ import annotations

import numpy as np

try:  # same transform, about 4x faster than numpy.fft on batches (measured); numpy alone suffices
    from scipy.fft import rfft
except ImportError:  # the deployment predictor's minimal environment
    from numpy.fft import rfft

EPS = 1e-6  # log floor: log(mel + EPS)


def hann(n_fft: int) -> np.ndarray:
    """Periodic Hann window (scipy.signal.get_window('hann', n_fft, fftbins=True))."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def frames(n_samples: int, n_fft: int, hop: int) -> int:
    """Number of STFT frames for a clip of ``n_samples`` with centred framing."""
    return 1 + (n_samples + 2 * (n_fft // 2) - n_fft) // hop


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above."""
    hz = np.asanyarray(hz, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mels = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney-normalised: librosa.filters.mel's numbers.

    Written out here so that neither preprocessing nor the predictor needs librosa (tested equal).
    """
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    mel_freqs = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_freqs)
    ramps = np.subtract.outer(mel_freqs, fft_freqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:n_mels + 2] - mel_freqs[:n_mels]))[:, np.newaxis]
    return weights


def log_mel(batch: np.ndarray, mel_filters: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(B, N) float waveforms -> (B, n_mels, frames) float32 log-mel.

    Call it on a few clips at a time (8 is fastest here): the frame arrays then stay in cache.
    """
    batch = np.asarray(batch, dtype=np.float32)
    pad = n_fft // 2
    padded = np.pad(batch, ((0, 0), (pad, pad)))
    n_frames = frames(batch.shape[1], n_fft, hop)
    windows = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop][:, :n_frames]
    spectrum = rfft(windows * hann(n_fft), axis=-1)  # (B, T, F) complex64
    parts = spectrum.view(np.float32).reshape(*spectrum.shape, 2)  # real/imag as a float axis: faster
    power = parts[..., 0] ** 2 + parts[..., 1] ** 2
    filters_t = np.ascontiguousarray(mel_filters.T, dtype=np.float32)
    mel = power.reshape(-1, power.shape[-1]) @ filters_t  # one 2-D GEMM
    np.log(mel + EPS, out=mel)
    return mel.reshape(len(batch), n_frames, -1).transpose(0, 2, 1)


def log_mel_torch(batch, mel_filters, n_fft: int, hop: int):
    """Same as ``log_mel`` for a torch tensor (any device); returns a float32 tensor."""
    import torch

    batch = batch.to(torch.float32)
    pad = n_fft // 2
    padded = torch.nn.functional.pad(batch, (pad, pad))
    n_frames = frames(batch.shape[1], n_fft, hop)
    windows = padded.unfold(1, n_fft, hop)[:, :n_frames]
    window = torch.as_tensor(hann(n_fft), device=batch.device)
    spectrum = torch.fft.rfft(windows * window, dim=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    filters = torch.as_tensor(np.asarray(mel_filters, np.float32), device=batch.device)
    return torch.log(power @ filters.T + EPS).transpose(1, 2)
