"""Shared fixtures: real media bytes, a temporary copy of the repository, a clean-params factory."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from mmpipe import params

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 20), seed: int = 0, fmt: str = "PNG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65535, size[::-1], dtype=np.uint16)
        img = Image.fromarray(arr)  # uint16 -> mode I;16
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8), "RGB").convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def tone(seconds: float = 0.5, rate: int = 16000, channels: int = 1, amplitude: float = 0.5, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def wav_bytes(samples: np.ndarray | None = None, rate: int = 16000, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    samples = tone(rate=rate) if samples is None else samples
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def _section_factory(section: str):
    """make(**overrides) -> the validated section, defaults + overrides, one worker (fast tests)."""
    def make(**overrides):
        base = params.SECTIONS[section]().model_dump()
        base.update({"workers": 1, **overrides})
        return params.validate(section, base)
    return make


@pytest.fixture
def clean_params():
    return _section_factory("clean")


@pytest.fixture
def data_params():
    return _section_factory("data")


def copy_repo(dest: Path) -> Path:
    """Copy the git-tracked files of this checkout (as they are on disk) into ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def set_params(repo: Path, **sections) -> None:
    """Deep-merge ``{section: {key: value}}`` overrides into repo/params.yaml."""
    doc = yaml.safe_load((repo / "params.yaml").read_text())

    def merge(into, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v
    merge(doc, sections)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def stage_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env["PATH"] = f"{Path(os.sys.executable).parent}:{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git-initialised temporary copy of the repository (tiny profile set by each test)."""
    dest = copy_repo(tmp_path / "repo")
    env = stage_env(dest)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, env=env, check=True)
    return dest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Built-in corpus of 240 samples through collect, clean and the three preprocess steps (in-process)."""
    from mmpipe.data.clean import clean
    from mmpipe.data.collect import collect
    from mmpipe.features.preprocess import preprocess

    root = tmp_path_factory.mktemp("tiny_corpus")
    for folder in ("raw", "clean", "features/image", "features/text", "features/audio"):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"n_samples": 240, "workers": 1, "builtin": {"tts_variants": 4}}), root / "raw")
    clean(params.validate("clean", {"workers": 1}), root / "raw", root / "clean")
    for m in ("image", "text", "audio"):
        preprocess(m, params.validate("preprocess", {"workers": 1}), root / "clean", root / "features" / m)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_corpus, tmp_path_factory) -> Path:
    """A small fusion model trained 3 epochs on the tiny corpus: models/fusion-like folder."""
    from mmpipe.models.train import train

    out = tmp_path_factory.mktemp("tiny_model") / "fusion"
    small = params.ModelParams(dim=16, hidden=32, image_width=8, text_embed_dim=8, text_width=16, audio_width=8,
                               attention_heads=2)
    train(params.TrainParams(epochs=3, batch_size=32, device="cpu"), small, tiny_corpus / "features",
          ["image", "text", "audio"], out, None)
    return out
