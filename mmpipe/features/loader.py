"""Loader over the feature folders: memory-mapped shards of several modalities joined by sample id.

Batches are gathered with index arrays (one fancy-index per shard and array, no per-sample Python),
returned as torch tensors:

    image (B, C, H, W) uint8   text (B, L) int32   text_length (B,) int32   audio (B, M, T) float16
    available.<modality> (B,) bool (one per modality)   index (B,) int64 (position in the split)
    label: the target as the loss takes it (mmpipe/targets): a class (B,) int64, a standardised number (B,)
    float64, a multi-hot tag set (B, K) float32

(in the built-in layout; the arrays are whatever each modality's featurizer declares).

Normalisation (mean/std from ``state``) belongs to the model, so the same raw tensors serve any model.
``place(device, budget)`` holds the whole split in memory (RAM, or the GPU) when it fits the memory
budget (and, on a GPU, half its measured free memory); else the split is *streamed*: each batch is
gathered from the memory-mapped shards while the previous one trains (a reader thread; on CUDA into
pinned memory, copied ahead on a side stream), so RAM holds a few batches, never the split.

With ``embeddings=True`` a modality whose preprocess cached its frozen backbone's output
(``preprocess.<m>.embed``) is served as ``embedding.<m>`` (B, E) float16 instead of its raw arrays
(which ``get(..., raw=True)`` still reads): what ``train`` uses, while evaluate, compress and
export feed the raw arrays to the whole model.

Rows without a target (clean keeps them: ``label`` "") are left out unless ``labelled=False`` (then
batches carry no ``label``): supervised training and evaluation never see them.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.utils.data

from mmpipe.errors import PipelineError
from mmpipe.modalities import names
from mmpipe.names import EMBEDDING_ARRAY, INDEX_FILE, STATE_FILE, available_key, embedding_key, shard_path
from mmpipe.targets import UNLABELLED, Target, target_of


def feature_modalities(root: str | Path) -> tuple[str, ...]:
    """The registered modalities that preprocess built features for (a disabled one's folder holds a
    state saying so), in registry order."""
    found = []
    for m in names():
        state = Path(root) / m / STATE_FILE
        if not state.exists():
            raise PipelineError(f"{state} not found (run the preprocess@{m} stage)")
        if json.loads(state.read_text()).get("enabled", True):
            found.append(m)
    if not found:
        raise PipelineError(f"{root}: no modality has features")
    return tuple(found)


class FeatureSet:
    def __init__(self, root: str | Path = "data/features", split: str | None = "train",
                 modalities: tuple[str, ...] | None = None, embeddings: bool = False, labelled: bool = True):
        self.root, self.split = Path(root), split
        self.modalities = tuple(modalities) if modalities is not None else feature_modalities(root)
        self.state: dict[str, dict] = {}
        self._shards: dict[str, list[np.ndarray]] = {}  # batch key -> its shards (memory-mapped)
        self._shard_of: dict[str, int] = {}  # batch key -> rows per shard
        self.embedded: tuple[str, ...] = ()  # modalities served as cached embeddings
        self._device_arrays: dict[str, torch.Tensor] | None = None  # the split held in memory (``to``)
        self._stream_device: torch.device | None = None  # where streamed batches go (``place``)
        reference = None
        available = []
        for m in self.modalities:
            folder = self.root / m
            if not (folder / INDEX_FILE).exists():
                raise PipelineError(f"{folder / INDEX_FILE} not found (run the preprocess@{m} stage)")
            self.state[m] = json.loads((folder / STATE_FILE).read_text())
            index = pq.read_table(folder / INDEX_FILE)
            ids = index.column("sample_id").to_numpy(zero_copy_only=False)
            if reference is None:
                reference = index
                cells = index.column("label").to_numpy(zero_copy_only=False)
                keep = np.ones(index.num_rows, bool) if split is None else \
                    index.column("split").to_numpy(zero_copy_only=False) == split
                if labelled:
                    keep &= cells != UNLABELLED
                self.rows = np.flatnonzero(keep).astype(np.int64)
                self.unlabelled = int((cells[self.rows] == UNLABELLED).sum())  # rows without a target (pretrain)
                self.sample_ids = ids[self.rows]
                # (features from before targets were declared: one class per sample, the state's labels)
                self.target: Target = target_of(self.state[m].get("target") or
                                                {"type": "category", "column": "label",
                                                 "state": {"labels": self.state[m]["labels"]}})
                self.labels = self.target.encode(cells[self.rows]) if labelled else None
            elif not np.array_equal(ids, reference.column("sample_id").to_numpy(zero_copy_only=False)):
                # every modality is built from the same clean table in the same order
                raise PipelineError(f"{folder / INDEX_FILE}: samples differ from {self.modalities[0]}'s; "
                                    f"re-run the preprocess stages")
            available.append(index.column("available").to_numpy()[self.rows])
            files = {name: name for name in self.state[m]["arrays"]}
            if embeddings and self.state[m].get("embedding"):
                files[embedding_key(m)] = EMBEDDING_ARRAY
                self.embedded += (m,)
            for key, stem in files.items():
                self._shards[key] = [np.load(shard_path(folder, stem, k), mmap_mode="r")
                                     for k in range(self.state[m]["shards"])]
                self._shard_of[key] = self.state[m]["shard_rows"]
        self.available = np.stack(available, axis=1)
        embedded_arrays = {name for m in self.embedded for name in self.state[m]["arrays"]}
        self._served = [key for key in self._shards if key not in embedded_arrays]

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, positions: np.ndarray) -> "FeatureSet":
        """Keep only the samples at ``positions`` (e.g. a share of the labels: ``train.label_fraction``);
        before ``place``."""
        positions = np.asarray(positions, dtype=np.int64)
        self.rows, self.sample_ids, self.available = self.rows[positions], self.sample_ids[positions], \
            self.available[positions]
        if self.labels is not None:
            self.labels = self.labels[positions]
        return self

    @property
    def label_names(self) -> list[str]:
        return self.state[self.modalities[0]]["labels"]

    def _gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        shards, size = self._shards[name], self._shard_of[name]
        if len(shards) == 1:
            return shards[0][rows]
        shard, offset = np.divmod(rows, size)
        out = np.empty((len(rows), *shards[0].shape[1:]), shards[0].dtype)
        for k in np.unique(shard):
            mask = shard == k
            out[mask] = shards[k][offset[mask]]
        return out

    def get(self, positions: np.ndarray, raw: bool = False) -> dict[str, torch.Tensor]:
        """The samples at ``positions`` (0..len-1) of this split, as a dict of tensors; ``raw``: every
        modality's raw arrays too, beside the cached embeddings."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._device_arrays is not None and not raw:
            index = torch.as_tensor(positions, device=next(iter(self._device_arrays.values())).device)
            return {name: values[index] for name, values in self._device_arrays.items()} | {"index": index}
        rows = self.rows[positions]
        batch = {name: torch.from_numpy(self._gather(name, rows)) for name in (self._shards if raw else self._served)}
        for k, m in enumerate(self.modalities):
            batch[available_key(m)] = torch.from_numpy(np.ascontiguousarray(self.available[positions, k]))
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[positions])
        batch["index"] = torch.from_numpy(positions)
        return batch

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                shard: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch. With ``shuffle`` each batch is a random set, read in ascending row order (locality).

        ``shard=(rank, n)``: this process's 1/n of the epoch (data-parallel training). As torch's
        DistributedSampler does, the order is padded by wrapping around so that every rank gets the
        same number of samples, hence of batches (DDP needs each rank to take the same steps).
        """
        picks = self.picks(batch_size, shuffle, seed, drop_last, shard)
        if self._device_arrays is not None:  # held in memory: gathering is an index, nothing to overlap
            yield from (self.get(positions) for positions in picks)
        else:
            yield from self._streamed(picks)

    def picks(self, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
              shard: tuple[int, int] = (0, 1)) -> Iterator[np.ndarray]:
        """The positions of each batch of one epoch, as ``batches`` reads them (see there)."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        rank, n_shards = shard
        if n_shards > 1:
            order = np.resize(order, -(-len(order) // n_shards) * n_shards)[rank::n_shards]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        return (np.sort(order[start:start + batch_size]) if shuffle else order[start:start + batch_size]
                for start in range(0, stop, batch_size))

    def dataset(self) -> "FeatureDataset":
        """This split as a ``torch.utils.data.Dataset`` (for Lightning, Hugging Face Trainer, a plain
        DataLoader loop): see FeatureDataset."""
        return FeatureDataset(self)

    def _streamed(self, picks: Iterator[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        """Batches read from the shards one ahead of the consumer (a thread: the memory-mapped reads and
        copies release the GIL). With a CUDA stream device, each batch is pinned and copied on a side
        stream while the previous one computes; the consumer's stream waits for it before use."""
        cuda = self._stream_device is not None and self._stream_device.type == "cuda"
        side = torch.cuda.Stream(self._stream_device) if cuda else None

        def load(positions: np.ndarray) -> dict[str, torch.Tensor]:
            batch = self.get(positions)
            if not cuda:
                return batch
            with torch.cuda.stream(side):
                return {k: v.pin_memory().to(self._stream_device, non_blocking=True) for k, v in batch.items()}

        with cf.ThreadPoolExecutor(1) as reader:
            ahead = None
            for positions in picks:
                following = reader.submit(load, positions)
                if ahead is not None:
                    yield self._ready(ahead.result(), side)
                ahead = following
            if ahead is not None:
                yield self._ready(ahead.result(), side)

    @staticmethod
    def _ready(batch: dict[str, torch.Tensor], side) -> dict[str, torch.Tensor]:
        if side is not None:
            current = torch.cuda.current_stream(side.device)
            current.wait_stream(side)
            for t in batch.values():  # the caching allocator must not reuse these until the consumer is done
                t.record_stream(current)
        return batch

    @property
    def nbytes(self) -> int:
        """Bytes of this split's served arrays: what holding it in memory takes."""
        rows = len(self)
        served = sum(rows * int(np.prod(self._shards[key][0].shape[1:], dtype=np.int64)) * self._shards[key][0].dtype.itemsize
                     for key in self._served if self._shards[key])
        labels = 0 if self.labels is None else self.labels[:1].nbytes
        return int(served + rows * (self.available.shape[1] + labels + 8))  # + availability, labels, positions

    def to(self, device: str | torch.device) -> "FeatureSet":
        """Hold the whole split on ``device`` (RAM for 'cpu'); later batches are gathered there."""
        everything = self.get(np.arange(len(self)))
        everything.pop("index")
        self._device_arrays = {name: t.to(device) for name, t in everything.items()}
        return self

    def place(self, device: str | torch.device, budget_bytes: int) -> str:
        """Hold the split on ``device`` if it fits ``budget_bytes`` (and, on CUDA, half the GPU's free
        memory, measured now): ``"in_memory"``; else stream its batches to ``device``: ``"streamed"``."""
        device = torch.device(device)
        fits = self.nbytes <= budget_bytes
        if fits and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            fits = self.nbytes <= free // 2  # room left for the model, activations and the other split
        if fits:
            self.to(device)
            return "in_memory"
        self._stream_device = device
        return "streamed"


class FeatureDataset(torch.utils.data.Dataset):
    """A FeatureSet as a map-style torch Dataset, so that other training code reuses the features.

    ``dataset[i]`` is one sample (a dict of tensors without the batch dimension); ``__getitems__`` —
    what DataLoader calls with a whole batch of indices — gathers the batch at once from the shards (one
    fancy index per shard, as ``FeatureSet.batches``), so give the DataLoader ``collate_fn=dataset.collate``
    (the batch is already collated; torch's default would take it apart). ``batch_sampler(...)`` yields the
    very batches ``FeatureSet.batches`` reads (same shuffle, same seed):

        data = FeatureSet("data/features", "train").dataset()
        loader = DataLoader(data, batch_size=64, shuffle=True, collate_fn=data.collate)
        loader = DataLoader(data, batch_sampler=data.batch_sampler(64, shuffle=True, seed=0), collate_fn=data.collate)

    Worker processes (``num_workers > 0``) share the memory-mapped shards when forked (Linux's default).
    """

    def __init__(self, features: FeatureSet):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= position < len(self):
            raise IndexError(f"sample {position} of a split of {len(self)}")
        batch = self.features.get(np.array([position % len(self)]))
        return {name: values[0] for name, values in batch.items()}

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        return self.features.get(np.asarray(positions, dtype=np.int64))

    @staticmethod
    def collate(batch) -> dict[str, torch.Tensor]:
        """The batch ``__getitems__`` gathered, as it is; a list of single samples (``dataset[i]``) stacked."""
        if isinstance(batch, dict):
            return batch
        return {name: torch.stack([sample[name] for sample in batch]) for name in batch[0]}

    def batch_sampler(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                      drop_last: bool = False) -> "BatchPicks":
        return BatchPicks(self.features, batch_size, shuffle, seed, drop_last)


class BatchPicks:
    """The positions of ``FeatureSet.batches``' batches as a DataLoader batch sampler (re-iterable:
    each epoch the same order, as ``batches`` with the same seed; pass another seed for another order)."""

    def __init__(self, features: FeatureSet, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.features, self.args = features, (batch_size, shuffle, seed, drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return (picks.tolist() for picks in self.features.picks(*self.args))

    def __len__(self) -> int:
        batch_size, _, _, drop_last = self.args
        return len(self.features) // batch_size if drop_last else -(-len(self.features) // batch_size)
