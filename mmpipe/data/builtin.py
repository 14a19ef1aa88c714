"""The built-in corpus ``builtin:digits``: spoken, written and handwritten digits, made offline.

Every sample's content depends only on ``(seed, index)``: a smaller corpus is a prefix of a larger
one, and the same seed gives the same bytes. Material comes from pip packages only:

* image: real handwritten digit scans (scikit-learn's bundled 8x8 digits, 1,797 scans), upscaled,
  placed, rotated, coloured and noised; PNG or JPEG.
* audio: the digit's name spoken by the espeak-ng engine (``espeakng-loader`` wheel): a bank of
  ``tts_variants`` utterances per digit with random voice, accent, rate and pitch (a fifth in
  another language), synthesised once per run; each sample takes one, changes its speed, pads it
  and mixes in noise at a random SNR; WAV or FLAC.
* text: the digit in a random written form: English word, numeral, another language, Roman
  numeral, arithmetic, inside a short phrase, in any case, sometimes misspelt.
* tabular (opt-in, ``data.builtin.tabular``): the scan's metadata as a record — ink coverage of the
  scan, writing time, a clerk's even/odd note, the writer's age, the source and the scanner; a few
  columns weakly informative of the digit, the others not at all; cells sometimes empty or garbled.

Each modality of each sample is independently *clean*, *degraded* (so noisy it carries little
or no information) or *missing* with the probabilities in ``data.builtin``, so that no single
modality suffices and fusing the three does. docs/data.md explains the numbers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import Field, model_validator

from mmpipe.schema import Strict

# The renderers import their codecs (Pillow, soundfile, soxr, espeak-ng) when they run: params imports
# this module for its schema in every stage, which then pays nothing for them.

LABELS = tuple(str(d) for d in range(10))
# data.target.type set: properties of the digit each sample shows (1 has none: the empty set occurs)
DIGIT_TAGS = {"even": {0, 2, 4, 6, 8}, "prime": {2, 3, 5, 7}, "loop": {0, 6, 8, 9}, "large": {5, 6, 7, 8, 9}}


def target_cell(label: str, target_type: str) -> str:
    """The corpus's target cell of a sample showing ``label`` (a digit) for data.target.type: the digit as a
    class (category), its value (number), the ``;``-separated tags of its properties (set)."""
    if target_type == "set":
        return ";".join(tag for tag, digits in DIGIT_TAGS.items() if int(label) in digits)
    return label  # the class "7" and the number 7 are written alike
STATES = ("clean", "degraded", "missing")


# --------------------------------------------------------------------------- params (data.builtin)


class PerModality(Strict):
    """One probability per modality of the built-in corpus."""

    image: float = Field(ge=0.0, le=1.0)
    text: float = Field(ge=0.0, le=1.0)
    audio: float = Field(ge=0.0, le=1.0)
    tabular: float = Field(0.15, ge=0.0, le=1.0)  # used with ``tabular: true``


class BuiltinCorpus(Strict):
    image_size: int = Field(32, ge=16, le=256)
    audio_sample_rate: int = Field(16000, ge=8000, le=48000)
    tts_variants: int = Field(64, ge=1, le=10000)
    p_missing: PerModality = PerModality(image=0.15, text=0.15, audio=0.15)
    p_degraded: PerModality = PerModality(image=0.10, text=0.10, audio=0.10)
    p_jpeg: float = Field(0.2, ge=0.0, le=1.0)
    p_flac: float = Field(0.3, ge=0.0, le=1.0)
    snr_db: tuple[float, float] = (5.0, 30.0)
    degraded_snr_db: tuple[float, float] = (-15.0, -5.0)
    tabular: bool = False  # also generate metadata records (the fourth modality)
    p_bad_cell: float = Field(0.02, ge=0.0, le=1.0)  # tabular: share of numeric cells garbled ("n/a", "?")

    @model_validator(mode="after")
    def _check(self) -> "BuiltinCorpus":
        for m in ("image", "text", "audio", "tabular"):
            total = getattr(self.p_missing, m) + getattr(self.p_degraded, m)
            if total > 1.0:
                raise ValueError(f"p_missing.{m} + p_degraded.{m} = {total:g} must be <= 1")
        for name in ("snr_db", "degraded_snr_db"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be [low, high] with low <= high, got [{lo}, {hi}]")
        return self


WORDS = {
    "en": "zero one two three four five six seven eight nine".split(),
    "fr": "zéro un deux trois quatre cinq six sept huit neuf".split(),
    "de": "null eins zwei drei vier fünf sechs sieben acht neun".split(),
    "es": "cero uno dos tres cuatro cinco seis siete ocho nueve".split(),
    "it": "zero uno due tre quattro cinque sei sette otto nove".split(),
    "nl": "nul een twee drie vier vijf zes zeven acht negen".split(),
    "pt": "zero um dois três quatro cinco seis sete oito nove".split(),
    "sv": "noll ett två tre fyra fem sex sju åtta nio".split(),
}
ROMAN = ["nulla", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"]
PHRASES = ["{}", "{}", "{}", "the number {}", "it's a {}", "{}!", "digit {}", "I think this is {}",
           "looks like a {} to me", "label: {}", "{}?", "maybe {}", "definitely {}", "a handwritten {}"]
UNINFORMATIVE = ["unreadable", "no idea", "???", "n/a", "can't tell", "smudged", "illegible scan",
                 "not sure", "-", "skip", "blurry", "see image"]
EN_VOICES = ["en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"]
VOICE_VARIANTS = ["", "+f1", "+f2", "+f3", "+f4", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+klatt", "+croak"]
OTHER_LANGUAGES = ["fr", "de", "es", "it", "nl", "pt", "sv"]


@lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (1797, 8, 8) uint8 in 0..255, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images / 16.0 * 255.0).astype(np.uint8)
    return images, digits.target.astype(np.int64)


@lru_cache(maxsize=1)
def _scans_by_label() -> list[np.ndarray]:
    _, targets = digit_scans()
    return [np.flatnonzero(targets == d) for d in range(10)]


@lru_cache(maxsize=2)
def speech_bank(seed: int, variants_per_digit: int, sample_rate: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """``bank[digit][k]``: float32 speech at ``sample_rate``, the same for the same arguments."""
    import soxr

    from mmpipe.data import tts

    rng = np.random.default_rng([seed, 0xBA4C])
    requests: list[tts.Request] = []
    for digit in range(10):
        for _ in range(variants_per_digit):
            if rng.random() < 0.8:
                voice = EN_VOICES[rng.integers(len(EN_VOICES))] + VOICE_VARIANTS[rng.integers(len(VOICE_VARIANTS))]
                word = WORDS["en"][digit]
            else:
                language = OTHER_LANGUAGES[rng.integers(len(OTHER_LANGUAGES))]
                voice, word = language, WORDS[language][digit]
            requests.append((word, voice, int(rng.integers(120, 260)), int(rng.integers(20, 81)), int(rng.integers(20, 90))))
    tts_rate, clips = tts.synthesize(requests)
    speech = [soxr.resample(c.astype(np.float32) / 32768.0, tts_rate, sample_rate, quality="HQ") for c in clips]
    return tuple(tuple(speech[d * variants_per_digit:(d + 1) * variants_per_digit]) for d in range(10))


@dataclass(frozen=True)
class Sample:
    index: int
    label: str
    group: str
    condition: str
    image: bytes | None
    audio: bytes | None
    text: bytes | None
    tabular: bytes | None = None


def _draw_states(rng: np.random.Generator, cfg) -> dict[str, str]:
    states = {}
    for m in ("image", "text", "audio"):
        u = rng.random()
        p_miss, p_deg = getattr(cfg.p_missing, m), getattr(cfg.p_degraded, m)
        states[m] = "missing" if u < p_miss else "degraded" if u < p_miss + p_deg else "clean"
    # Image or audio is always present: both carry per-sample noise, so no two samples are
    # byte-identical duplicates (a text-only sample could repeat and be dropped by clean).
    if states["image"] == "missing" and states["audio"] == "missing":
        states[("image", "audio")[int(rng.integers(2))]] = "degraded"
    return states


def render_image(scan: np.ndarray, rng: np.random.Generator, size: int, degraded: bool, p_jpeg: float) -> bytes:
    from PIL import Image

    inner = int(round(size * rng.uniform(0.65, 0.95)))
    glyph = Image.fromarray(scan).resize((inner, inner), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    dx, dy = rng.integers(0, size - inner + 1, size=2)
    canvas.paste(glyph, (int(dx), int(dy)))
    ink = np.asarray(canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR), np.float32) / 255.0
    grayscale = rng.random() < 0.3
    channels = 1 if grayscale else 3
    fg = rng.uniform(150, 255, channels)
    bg = rng.uniform(0, 90, channels)
    if rng.random() < 0.5:
        fg, bg = bg, fg  # dark ink on light paper as often as the reverse
    pixels = bg + ink[..., None] * (fg - bg)
    sigma = rng.uniform(70, 110) if degraded else rng.uniform(2, 12)
    pixels = pixels + rng.normal(0.0, sigma, pixels.shape)
    if degraded:  # occlude most of the glyph with a noise block
        h, w = (int(size * rng.uniform(0.55, 0.85)) for _ in range(2))
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        pixels[y:y + h, x:x + w] = rng.uniform(0, 255, (h, w, channels))
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if grayscale else pixels)  # uint8 2-D -> L, 3-D -> RGB
    out = io.BytesIO()
    if rng.random() < p_jpeg:
        img.save(out, format="JPEG", quality=int(rng.integers(75, 96)))
    else:
        img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def render_audio(speech: np.ndarray, rng: np.random.Generator, sample_rate: int, degraded: bool,
                 snr_db: tuple[float, float], degraded_snr_db: tuple[float, float], p_flac: float) -> bytes:
    """One recording of a bank utterance: new speed, gain, silence around it, noise at a random SNR."""
    import soundfile as sf
    import soxr

    speed = rng.uniform(0.85, 1.15)  # tempo and pitch together, like a tape played faster/slower
    speech = soxr.resample(speech, sample_rate * speed, sample_rate, quality="MQ").astype(np.float32)
    speech *= rng.uniform(0.3, 0.9) / max(float(np.abs(speech).max()), 1e-6)
    lead, trail = (int(rng.uniform(0.05, 0.3) * sample_rate) for _ in range(2))
    signal = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    speech_power = float(np.mean(np.square(speech))) + 1e-12
    snr = rng.uniform(*(degraded_snr_db if degraded else snr_db))
    noise = rng.normal(0.0, 1.0, signal.shape[0])
    if rng.random() < 0.5:  # brown-ish noise half of the time (hum, rumble), white otherwise
        noise = np.cumsum(noise)
        noise -= np.linspace(noise[0], noise[-1], noise.shape[0])
        noise /= noise.std() + 1e-12
    noise *= np.sqrt(speech_power / 10.0 ** (snr / 10.0))
    mixed = np.clip(signal + noise, -1.0, 1.0)
    peak = float(np.abs(mixed).max())
    if peak > 0.99:
        mixed *= 0.99 / peak
    out = io.BytesIO()
    if rng.random() < p_flac:
        sf.write(out, mixed, sample_rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(out, mixed, sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _misspell(word: str, rng: np.random.Generator) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(len(word) - 1))
    edit = rng.integers(4)
    if edit == 0:  # swap neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    if edit == 2:  # double a letter
        return word[:i] + word[i] + word[i:]
    return word[:i] + "abcdefghijklmnopqrstuvwxyz"[rng.integers(26)] + word[i + 1:]


def render_text(digit: int, rng: np.random.Generator, degraded: bool) -> bytes:
    if degraded:
        if rng.random() < 0.5:
            return UNINFORMATIVE[rng.integers(len(UNINFORMATIVE))].encode()
        letters = "abcdefghijklmnopqrstuvwxyz?#*"
        n = int(rng.integers(3, 9))
        return "".join(letters[rng.integers(len(letters))] for _ in range(n)).encode()
    form = rng.random()
    if form < 0.35:
        token = WORDS["en"][digit]
    elif form < 0.55:
        token = str(digit)
    elif form < 0.80:
        token = WORDS[OTHER_LANGUAGES[rng.integers(len(OTHER_LANGUAGES))]][digit]
    elif form < 0.88:
        token = ROMAN[digit]
    else:
        a = int(rng.integers(0, digit + 1))
        op_words = rng.random() < 0.5
        token = f"{WORDS['en'][a]} plus {WORDS['en'][digit - a]}" if op_words else f"{a}+{digit - a}"
    if token.isalpha() and len(token) > 3 and rng.random() < 0.25:
        token = _misspell(token, rng)
    case = rng.random()
    if case < 0.15:
        token = token.upper()
    elif case < 0.35:
        token = token.capitalize()
    return PHRASES[rng.integers(len(PHRASES))].format(token).encode()


# per digit: mean seconds to write it (a loop or two strokes take longer)
WRITING_SECONDS = (2.4, 1.2, 2.2, 2.6, 2.3, 2.5, 2.1, 1.6, 2.9, 2.2)
SOURCES = ("census", "postal", "bank", "school")
SCANNERS = ("S-100", "S-200", "flatbed", "phone")


def render_record(digit: int, scan: np.ndarray, rng: np.random.Generator, degraded: bool, p_bad_cell: float) -> bytes:
    """The scan's metadata: ink coverage (from the scan itself) and writing time inform a little,
    the clerk's even/odd note is right 3 times in 4; age, source and scanner carry nothing. Degraded:
    every cell drawn without regard to the digit. Each cell is empty 1 time in 10."""
    shown = int(rng.integers(10)) if degraded else digit
    shown_scan = scan if not degraded else np.full_like(scan, int(rng.integers(40, 120)))
    parity = ("even", "odd")[shown % 2]
    record = {
        "ink_coverage": round(float(shown_scan.mean()) / 255 * 100 + float(rng.normal(0, 3)), 1),
        "writing_seconds": round(WRITING_SECONDS[shown] * float(rng.lognormal(0, 0.25)), 2),
        "clerk_note": parity if rng.random() < 0.75 else ("even", "odd", "unsure")[int(rng.integers(3))],
        "writer_age": int(np.clip(rng.normal(40, 15), 8, 90)),
        "source": SOURCES[int(rng.integers(len(SOURCES)))],
        "scanner": SCANNERS[int(rng.integers(len(SCANNERS)))],
    }
    for key in list(record):
        u = rng.random()
        if u < 0.1:
            record[key] = None
        elif u < 0.1 + p_bad_cell and isinstance(record[key], float):
            record[key] = ("n/a", "?", "#VALUE!")[int(rng.integers(3))]
    return json.dumps(record).encode()


def make_sample(index: int, seed: int, cfg, bank) -> Sample:
    """The ``index``-th sample of the corpus for ``seed``; ``cfg`` is ``data.builtin``, ``bank`` its speech_bank."""
    rng = np.random.default_rng([seed, index])
    digit = int(rng.integers(10))
    states = _draw_states(rng, cfg)
    scans, _ = digit_scans()
    candidates = _scans_by_label()[digit]
    scan_index = int(candidates[rng.integers(len(candidates))])
    # Separate streams per modality: changing one modality's knobs leaves the others' bytes alone.
    image_rng, audio_rng, text_rng = (np.random.default_rng([seed, index, k]) for k in (1, 2, 3))
    image = None if states["image"] == "missing" else render_image(
        scans[scan_index], image_rng, cfg.image_size, states["image"] == "degraded", cfg.p_jpeg)
    audio = None if states["audio"] == "missing" else render_audio(
        bank[digit][audio_rng.integers(len(bank[digit]))], audio_rng, cfg.audio_sample_rate, states["audio"] == "degraded",
        tuple(cfg.snr_db), tuple(cfg.degraded_snr_db), cfg.p_flac)
    condition = ";".join(f"{m}={s}" for m, s in states.items())
    text = None if states["text"] == "missing" else render_text(digit, text_rng, states["text"] == "degraded")
    tabular = None
    if cfg.tabular:  # its own stream, drawn after the others: the three-modality corpus is unchanged
        tabular_rng = np.random.default_rng([seed, index, 4])
        u = tabular_rng.random()
        state = "missing" if u < cfg.p_missing.tabular else "degraded" if u < cfg.p_missing.tabular + cfg.p_degraded.tabular else "clean"
        condition += f";tabular={state}"
        if state != "missing":
            tabular = render_record(digit, scans[scan_index], tabular_rng, state == "degraded", cfg.p_bad_cell)
    return Sample(
        index=index,
        label=LABELS[digit],
        group=f"scan-{scan_index}",  # one scan never straddles splits: image test accuracy stays honest
        condition=condition,
        image=image,
        audio=audio,
        text=text,
        tabular=tabular,
    )
