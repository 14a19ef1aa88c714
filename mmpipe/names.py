"""The ground floor: every name one module writes and another reads.

File names inside the stages' output folders, the keys of a loader batch, and the features digest.
They live here, below every module that writes or reads them, so that a reader never imports the
writer (the loader used to import preprocess for a file name, which imported the embedding cache,
which imported the fusion model, which imported the loader).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# data/raw (collect)
DECLARED_FILE = "declared.json"  # the data.<record modality> params collect gathered columns under

# data/clean (clean)
SAMPLES_DIR = "samples"  # only part files in it: pd.read_parquet("data/clean/samples") reads them all
REJECTS_FILE = "rejects.parquet"
DATASET_FILE = "dataset.json"

# data/features/<modality> (preprocess)
INDEX_FILE = "index.parquet"
STATE_FILE = "state.json"
PART_FILE, PART_STATS = "part.json", "train_stats.npz"  # a partition's record and its tasks' statistics
EMBEDDING_ARRAY = "embedding"  # shard file stem of the cached backbone embeddings (features/embed.py)


def shard_path(folder: Path, array: str, shard: int) -> Path:
    return Path(folder) / f"{array}-{shard:05d}.npy"


def features_digest(features_root: Path) -> str:
    """Identity of the feature sets without DVC: each modality's index and fitted state (also what a
    training checkpoint is keyed by, so that it resumes only on the very data it was trained on)."""
    digest = hashlib.sha1()
    for folder in sorted(p for p in Path(features_root).iterdir() if p.is_dir()):
        for name in (INDEX_FILE, STATE_FILE):
            if (folder / name).exists():
                digest.update((folder / name).read_bytes())
    return digest.hexdigest()


# a loader batch (features/loader.py) and the model's input
def available_key(modality: str) -> str:
    """The batch key of a modality's availability column."""
    return f"available.{modality}"


def embedding_key(modality: str) -> str:
    """The batch key of a modality's cached backbone embedding."""
    return f"embedding.{modality}"


# model.fusion: the fusion heads of models/fusion.py (here: params validates them without importing torch)
FUSIONS = ("concat", "gated", "attention")

# models/<name> (train), artifacts/compressed/<variant>
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
