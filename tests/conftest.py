"""Shared fixtures: real media bytes, a temporary copy of the repository, a clean-params factory."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

from mmpipe import params
from mmpipe.modalities import names

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
        base = params.schema(section)().model_dump()
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


# The tiny profile of the end-to-end tests: every stage runs, in about a minute on 2 cores.
# Four modalities: the built-in corpus's metadata records are on (the default params keep three).
TINY = {"data": {"n_samples": 200, "builtin": {"tts_variants": 6, "tabular": True}}, "clean": {"min_per_class": 2},
        "model": {"dim": 16, "hidden": 16, "encoders": {"image": {"width": 4}, "text": {"width": 8}, "audio": {"width": 4},
                                                        "tabular": {"width": 8}}},
        "pretrain": {"enabled": True, "epochs": 1, "batch_size": 32},  # aligned encoders -> train, retrieval in evaluate
        "train": {"epochs": 1, "baselines": False},
        "evaluate": {"noise_levels": [0.0, 0.5, 1.0], "latency_runs": 5,  # gates: a one-epoch model meets no bar
                     "gates": {"min_accuracy": None, "min_coverage": None, "max_modality_share": None}},
        "compress": {"latency_runs": 5, "prune": {"finetune_epochs": 1},
                     "quantize": {"calibration_samples": 64, "layers": "all"},
                     # a student through to the bundle (4-channel encoders cannot shrink to a quarter of the MACs)
                     "distill": {"enabled": True, "epochs": 1, "batch_size": 32, "width_scale": 0.5,
                                 "max_macs_share": 1.0, "robustness_levels": [0.0, 1.0]}}}
DVC = str(Path(sys.executable).parent / "dvc")


def git_commit(repo: Path, message: str) -> None:
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=repo, env=stage_env(repo), check=True, capture_output=True)


def git_init(dest: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=dest, env=stage_env(dest), check=True)
    git_commit(dest, "copy")
    return dest


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DVC, *args], cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=900)


def ran_stages(proc: subprocess.CompletedProcess) -> list[str]:
    """Stages `dvc repro` actually ran (not skipped, not restored from the run-cache)."""
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage '")]


def _search(repo: Path, role_filter: str):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=["mmpipe"], filter_string=role_filter,
                              order_by=["attributes.start_time ASC"])


def all_runs(repo: Path):
    """Every run in repo's MLflow store (stage runs, pipeline rows, tune rows and trials), oldest first."""
    return _search(repo, "")


def runs(repo: Path):
    """The stage runs in repo's MLflow store, oldest first (not the pipeline rows)."""
    table = _search(repo, "")
    if "tags.mmpipe.role" in table:
        table = table[table["tags.mmpipe.role"] != "pipeline"].reset_index(drop=True)
    return table


def pipeline_rows(repo: Path):
    """The pipeline rows (one per pipeline execution), oldest first."""
    return _search(repo, "tags.`mmpipe.role` = 'pipeline'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(cmd: list[str], ready_url: str, log_path: Path, env: dict[str, str], cwd: Path,
                timeout_s: float = 180) -> Iterator[subprocess.Popen]:
    """Run a server process until ``ready_url`` answers 200; yield it; stop it afterwards."""
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "server did not come up: " + log_path.read_text()[-3000:]
            time.sleep(1)
        yield server
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git-initialised temporary copy of the repository (tiny profile set by each test)."""
    return git_init(copy_repo(tmp_path / "repo"))


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Built-in corpus of 240 samples, metadata records included (four modalities), through collect,
    clean and every preprocess step (in-process)."""
    from mmpipe.data.clean import clean
    from mmpipe.data.collect import collect
    from mmpipe.features.preprocess import preprocess

    root = tmp_path_factory.mktemp("tiny_corpus")
    for folder in ("raw", "clean", *(f"features/{m}" for m in names())):
        (root / folder).mkdir(parents=True)
    collect(params.validate("data", {"n_samples": 240, "workers": 1, "builtin": {"tts_variants": 4, "tabular": True}}),
            root / "raw")
    clean(params.validate("clean", {"workers": 1}), root / "raw", root / "clean")
    for m in names():
        preprocess(m, params.validate("preprocess", {"workers": 1}), root / "clean", root / "features" / m)
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_corpus, tmp_path_factory) -> Path:
    """A small fusion model trained 3 epochs on the tiny corpus: models/fusion-like folder."""
    from mmpipe.training.train import train

    out = tmp_path_factory.mktemp("tiny_model") / "fusion"
    small = params.ModelParams(dim=16, hidden=32, attention_heads=2, encoders={
        "image": {"width": 8}, "text": {"embed_dim": 8, "width": 16}, "audio": {"width": 8}, "tabular": {"width": 16}})
    train(params.TrainParams(epochs=3, batch_size=32, device="cpu"), small, tiny_corpus / "features",
          list(names()), out, None)
    return out


@pytest.fixture(scope="session")
def tiny_aligned(tiny_corpus, tmp_path_factory) -> Path:
    """The pretrain stage's output on the tiny corpus (two epochs): aligned encoders the bundle ships as embed.onnx."""
    from mmpipe.pretrain.align import pretrain

    out = tmp_path_factory.mktemp("tiny_aligned")
    small = params.ModelParams(dim=16, encoders={"image": {"width": 8}, "text": {"embed_dim": 8, "width": 16},
                                                 "audio": {"width": 8}, "tabular": {"width": 16}})
    pretrain(params.PretrainParams(enabled=True, epochs=2, batch_size=32, device="cpu"), small,
             tiny_corpus / "features", out)
    return out


@pytest.fixture(scope="session")
def bundle(tiny_corpus, tiny_model, tiny_aligned, tmp_path_factory) -> dict:
    """The deployment bundle of the tiny model: evaluate -> compress (pruned + int8) -> export, in-process (with
    the aligned embeddings of ``tiny_aligned``)."""
    from mmpipe.compress.compress import compress
    from mmpipe.deploy.export import export
    from mmpipe.evaluate.evaluate import evaluate

    root = tmp_path_factory.mktemp("export")
    (root / "compressed").mkdir()
    (root / "deploy").mkdir()
    eval_cfg = params.validate("evaluate", {"device": "cpu", "noise_levels": [0.0, 1.0], "latency_runs": 5})
    eval_metrics = evaluate(eval_cfg, tiny_corpus / "features", tiny_corpus / "clean", tiny_model.parent,
                            progress=lambda line: None)["metrics"]
    compress_cfg = params.validate("compress", {"latency_runs": 5, "max_accuracy_drop": 0.2,
                                                "prune": {"finetune_epochs": 1}, "quantize": {"calibration_samples": 64}})
    compress_metrics = compress(compress_cfg, tiny_corpus / "features", tiny_model, root / "compressed",
                                progress=lambda line: None)
    checks, _ = export(params.ExportParams(), root / "deploy", root / "compressed", tiny_model, tiny_corpus / "features",
                       tiny_corpus / "raw", tiny_corpus / "clean", eval_metrics, compress_metrics,
                       aligned_dir=tiny_aligned)
    return {"folder": root / "deploy", "checks": checks, "eval": eval_metrics, "compress": compress_metrics}


# The fast subset (`make test-fast`, CI on pull requests: `pytest -m "not slow"`) leaves out what runs a
# pipeline or trains: every test that uses one of these fixtures, every benchmark smoke run, and the
# tests marked slow by hand (a worker pool killed on purpose, a manifest of a million rows).
SLOW_FIXTURES = {"repo", "tiny_run", "tiny_model", "tiny_aligned", "aligned", "bundle", "trained", "workspace"}
SLOW_FILES = {"test_bench.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
