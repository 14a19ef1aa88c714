"""Speech synthesis with the espeak-ng engine shipped in the ``espeakng-loader`` wheel.

Driven through ctypes because no maintained Python binding exposes synthesis to memory with
voice/rate/pitch control without extra system packages.

espeak-ng's output depends on its call history within a process, even with its random seed
fixed (measured: the same request repeated gives clips of different lengths). It is
deterministic for a fixed sequence of requests in a *fresh* process, so ``synthesize`` always
runs the whole sequence in a new spawned process.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import multiprocessing

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH, _PARAM_RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Speaker:
    """Synthesises UTF-8 text to int16 samples at ``self.sample_rate`` (22050 Hz for espeak-ng)."""

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise from the espeakng-loader wheel")
        self.sample_rate = rate
        self._lib = lib
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: ctypes must not free it
        lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str = "en", rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> np.ndarray:
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
        self._lib.espeak_SetParameter(_PARAM_RANGE, int(pitch_range), 0)
        self._lib.espeak_ng_SetRandSeed(0)  # espeak_Initialize seeds it from the clock
        self._chunks.clear()
        payload = text.encode("utf-8") + b"\0"
        self._lib.espeak_Synth(payload, len(payload), 0, 0, 0, _ESPEAK_CHARS_UTF8, None, None)
        self._lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(self._chunks)


Request = tuple[str, str, int, int, int]  # text, voice, rate (words/min), pitch 0-100, pitch range 0-100


def _synthesize_here(requests: list[Request]) -> tuple[int, list[np.ndarray]]:
    speaker = Speaker()
    return speaker.sample_rate, [speaker.say(*r) for r in requests]


def synthesize(requests: list[Request]) -> tuple[int, list[np.ndarray]]:
    """Synthesise ``requests`` in order, in a fresh process: same requests -> same samples."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_synthesize_here, requests).result()
