"""The built-in corpus: deterministic, prefix-stable, every item decodes, knobs do what they say."""

from __future__ import annotations

import collections
import io

import numpy as np
import soundfile as sf
from PIL import Image

from mmpipe import params
from mmpipe.data import builtin

CFG = params.BuiltinCorpus(tts_variants=8)


def bank(seed=0):
    return builtin.speech_bank(seed, CFG.tts_variants, CFG.audio_sample_rate)


def sample(i, seed=0, cfg=CFG):
    return builtin.make_sample(i, seed, cfg, bank(seed))


def test_same_seed_same_bytes_and_other_seed_differs():
    a = [sample(i, 7) for i in range(20)]
    b = [sample(i, 7) for i in range(20)]
    c = [sample(i, 8) for i in range(20)]
    assert a == b
    assert [s.image for s in a] != [s.image for s in c]


def test_speech_bank_is_identical_across_processes():
    # espeak-ng depends on its call history; the bank is made in a fresh process each time
    builtin.speech_bank.cache_clear()
    first = bank(3)
    builtin.speech_bank.cache_clear()
    again = bank(3)
    assert len(first) == 10 and all(len(v) == CFG.tts_variants for v in first)
    assert all(np.array_equal(a, b) for da, db in zip(first, again) for a, b in zip(da, db))
    lengths = [len(clip) / CFG.audio_sample_rate for clips in first for clip in clips]
    assert 0.15 < min(lengths) and max(lengths) < 2.0


def test_every_item_is_a_real_decodable_file():
    for i in range(60):
        s = sample(i)
        assert s.label in builtin.LABELS
        if s.image is not None:
            img = Image.open(io.BytesIO(s.image))
            img.load()
            assert img.format in ("PNG", "JPEG") and img.size == (32, 32)
        if s.audio is not None:
            samples, rate = sf.read(io.BytesIO(s.audio))
            assert rate == 16000 and 0.2 < len(samples) / rate < 3.0
            assert np.abs(samples).max() > 0.05
        if s.text is not None:
            assert s.text.decode("utf-8").strip()
        assert s.image is not None or s.audio is not None


def test_state_probabilities_follow_params():
    cfg = params.BuiltinCorpus(tts_variants=8, p_missing={"image": 0.0, "text": 0.5, "audio": 0.0},
                               p_degraded={"image": 1.0, "text": 0.0, "audio": 0.0})
    states = collections.Counter()
    for i in range(400):
        s = sample(i, cfg=cfg)
        states.update(s.condition.split(";"))
    assert states["image=degraded"] == 400 and states["audio=clean"] == 400
    assert 150 < states["text=missing"] < 250


def test_labels_are_roughly_balanced():
    labels = collections.Counter(sample(i).label for i in range(1000))
    assert set(labels) == set(builtin.LABELS)
    assert min(labels.values()) > 60


def test_degraded_audio_is_noisier_than_clean():
    def snr_proxy(degraded):
        rng = np.random.default_rng(0)
        data = builtin.render_audio(bank()[3][0], rng, 16000, degraded, (20.0, 20.0), (-10.0, -10.0), p_flac=0.0)
        samples, _ = sf.read(io.BytesIO(data))
        head = samples[:400]  # leading pad: noise only
        return np.std(head) / np.std(samples)
    assert snr_proxy(True) > 3 * snr_proxy(False)


def test_text_forms_name_the_digit():
    texts = [builtin.render_text(7, np.random.default_rng(i), degraded=False).decode().lower() for i in range(300)]
    assert any("seven" in t for t in texts) and any("7" in t for t in texts)
    assert any("sieben" in t or "sept" in t or "siete" in t or "sette" in t for t in texts)
    assert any("vii" in t for t in texts)
