"""preprocess: one modality of data/clean -> index.parquet + fixed-shape tensor shards + fitted state.

Output folder (one per modality):
  index.parquet        sample_id, split, label (clean's canonical target text, "" = unlabelled), label_index
                       (a category target's class, else -1), shard, row, available — in clean's order
  <array>-NNNNN.npy    shards of ``shard_rows`` rows, fixed dtype/shape, memory-mappable (np.load(mmap_mode="r"))
  state.json           shapes, dtypes, mean/std fitted on the train split only, the modality's settings,
                       the target (clean's dataset.json: type, options, state)
  (+ modality files)   tokenizer.json (text), mel_filters.npy (audio)
  embedding-NNNNN.npy  with ``preprocess.<m>.embed``: the frozen backbone's output (mmpipe/features/embed.py)

Memory stays bounded by about one shard per worker thread; shards are written as they complete.

Partitions (``preprocess.partitions``): ``preprocess_part`` featurises the k-th 1/N of the shards into its
own folder (shard files + its tasks' train statistics + its decode failures), on any machine;
``preprocess`` then joins the N folders instead of featurising. Tasks never cross a shard boundary and
statistics are added in task order either way, so the joined folder is byte for byte the single run's.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from mmpipe.device import resolve_device
from mmpipe.errors import PipelineError
from mmpipe.io import iter_row_groups, worker_count, write_json_atomic
from mmpipe.modalities import MODALITIES
from mmpipe.names import DATASET_FILE, INDEX_FILE, PART_FILE, PART_STATS, SAMPLES_DIR, STATE_FILE, shard_path

INDEX_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("label_index", pa.int32(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("row", pa.int32(), nullable=False),
    pa.field("available", pa.bool_(), nullable=False),
])


def shard_count(total: int, shard_rows: int) -> int:
    return -(-total // shard_rows)


class RunningStats:
    """Mean/std from per-task float64 sums."""

    def __init__(self) -> None:
        self.count = 0
        self.total = self.total_sq = None

    def add(self, partial: tuple[np.ndarray, np.ndarray, int] | None) -> None:
        """Add one task's (sum, sum of squares, count); added in task order, so deterministic."""
        if partial is None:
            return
        s, sq, n = partial
        self.total = s if self.total is None else self.total + s
        self.total_sq = sq if self.total_sq is None else self.total_sq + sq
        self.count += n

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count:
            raise PipelineError("no available training sample to fit mean/std on")
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean ** 2, 0.0))
        return mean.tolist(), np.maximum(std, 1e-6).tolist()


class Task(NamedTuple):
    """Rows [start, stop) of one row group of one clean file; its first row is global row ``first``."""

    path: str
    row_group: int
    start: int
    stop: int
    first: int


class Runner:
    """Featurises tasks into in-memory shard buffers; safe to call from several threads at once.

    A shard is written (``np.save``) as soon as every row of it is done, so memory holds about one
    shard per worker. Measured faster than filling memory-mapped files, whose first writes pay for
    the file system's block allocation page by page.
    """

    def __init__(self, features, modality: str, out_dir: Path, shard_rows: int, total: int, device: str):
        self.features, self.modality, self.out_dir = features, modality, out_dir
        self.shard_rows, self.total, self.device = shard_rows, total, device
        self.shards = shard_count(total, shard_rows)
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per thread: the last row group read

    def _buffer(self, shard: int) -> dict[str, np.ndarray]:
        with self._lock:
            if shard not in self._buffers:
                rows = min(self.shard_rows, self.total - shard * self.shard_rows)
                self._buffers[shard] = {name: np.zeros((rows, *shape), dtype)
                                        for name, (shape, dtype) in self.features.arrays.items()}
            return self._buffers[shard]

    def write_done(self, rows_done: int) -> None:
        """Save every buffered shard whose rows all lie below ``rows_done`` (tasks finish in order)."""
        with self._lock:
            complete = [k for k in sorted(self._buffers) if min((k + 1) * self.shard_rows, self.total) <= rows_done]
            buffers = {k: self._buffers.pop(k) for k in complete}
        for shard, arrays in buffers.items():
            for name, values in arrays.items():
                np.save(shard_path(self.out_dir, name, shard), values)

    def _rows(self, task: Task) -> dict[str, list]:
        key = (task.path, task.row_group)
        if getattr(self._local, "key", None) != key:  # consecutive tasks share a row group: read it once
            self._local.table = pq.ParquetFile(task.path).read_row_group(
                task.row_group, columns=["sample_id", "split", self.modality, f"{self.modality}_available"])
            self._local.key = key
        return self._local.table.slice(task.start, task.stop - task.start).to_pydict()

    def __call__(self, task: Task) -> tuple[tuple[np.ndarray, np.ndarray, int] | None, dict[int, tuple[str, str]]]:
        """Featurise one task's rows; return its partial train statistics (sum, sum of squares, count)
        and the items that did not decode ({global row: (sample id, reason)}; made unavailable)."""
        features, modality = self.features, self.modality
        part = self._rows(task)
        available = np.asarray(part[f"{modality}_available"], bool)
        items = [v if ok else None for v, ok in zip(part[modality], available)]
        kwargs = {"device": self.device} if features.gpu else {}
        errors: dict[int, str] = {}
        arrays = features.transform(items, part["sample_id"], errors=errors, **kwargs)
        failed = {task.first + i: (part["sample_id"][i], reason) for i, reason in errors.items()}
        available[list(errors)] = False
        done = 0
        while done < len(items):  # the task may straddle a shard boundary
            shard, row = divmod(task.first + done, self.shard_rows)
            take = min(len(items) - done, self.shard_rows - row)
            buffer = self._buffer(shard)
            for name, values in arrays.items():
                buffer[name][row:row + take] = values[done:done + take]
            done += take
        if features.stats is None:
            return None, failed
        name, axes, scale = features.stats
        train = arrays[name][available & (np.asarray(part["split"]) == "train")]
        if not len(train):
            return None, failed
        # float64 accumulators without a float64 copy of the batch (uint8 squares fit in uint16)
        squares = np.square(train, dtype=np.uint16 if train.dtype == np.uint8 else np.float32)
        total = train.sum(axis=axes, dtype=np.float64) * scale
        return (total, squares.sum(axis=axes, dtype=np.float64) * scale ** 2, train.size // total.size), failed


def plan_tasks(files: list[Path], batch_rows: int, shard_rows: int) -> list[Task]:
    """Tasks of at most ``batch_rows`` rows, each within one row group and one shard (so that a
    partition, a range of shards, is a range of whole tasks)."""
    tasks, first = [], 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            start = 0
            while start < n:
                shard_end = ((first + start) // shard_rows + 1) * shard_rows - first
                stop = min(start + batch_rows, n, shard_end)
                tasks.append(Task(str(path), g, start, stop, first + start))
                start = stop
            first += n
    return tasks


def part_shards(total: int, shard_rows: int, part: int, parts: int) -> range:
    """The shards of partition ``part`` of ``parts``: consecutive, as even as whole shards allow."""
    shards = shard_count(total, shard_rows)
    return range(part * shards // parts, (part + 1) * shards // parts)


def train_values(files: list[Path], modality: str) -> list:
    """The available values of ``modality`` in the train split: what fitted state may see."""
    values = []
    for path in files:
        for table in iter_row_groups(path, ["split", modality, f"{modality}_available"]):
            part = table.to_pydict()
            values += [v for v, split, ok in zip(part[modality], part["split"], part[f"{modality}_available"])
                       if ok and split == "train"]
    return values


class Source(NamedTuple):
    """What every featurising run of one modality reads first: the clean data and the fitted featurizer."""
    dataset: dict
    files: list[Path]
    total: int
    cfg: Any
    features: Any  # the modality's Features, fitted on the train split; None: the data has none of it
    choices: dict  # the settings resolved from auto: key -> {value, why} (metrics/preprocess_<m>.json)


def open_source(modality: str, params, clean_dir: Path, model_params=None) -> Source:
    if modality not in MODALITIES:
        raise PipelineError(f"unknown modality '{modality}' (known: {', '.join(MODALITIES)})")
    module = MODALITIES[modality]
    dataset_file = clean_dir / DATASET_FILE
    if not dataset_file.exists():
        raise PipelineError(f"{dataset_file} not found (run the clean stage first)")
    dataset = json.loads(dataset_file.read_text())
    files = sorted((clean_dir / SAMPLES_DIR).glob("part-*.parquet"))
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    if not any(pq.read_table(p, columns=[f"{modality}_available"]).column(0).to_numpy().any() for p in files):
        return Source(dataset, files, total, None, None, {})
    cfg = getattr(params, modality)
    # settings left to auto, which follow the chosen encoder or the train split (image size, audio seconds)
    cfg, choices = module.resolve_preprocess(cfg, getattr(model_params.encoders, modality, None) if model_params
                                             else None, train_info(files, modality, module))
    for key, choice in choices.items():
        print(f"preprocess {modality}: {key}: auto -> {choice['value']} ({choice['why']})")
    features = module.Features(cfg, dataset)
    if features.fit is not None:
        features.fit(train_values(files, modality))
    return Source(dataset, files, total, cfg, features, choices)


def resolved(params, clean_dir: Path, model_params=None):
    """``params`` (the preprocess section) with every modality's settings left to auto resolved as
    preprocess resolves them from ``clean_dir`` (for code that featurizes by other means: benchmarks)."""
    files = sorted((clean_dir / SAMPLES_DIR).glob("part-*.parquet"))
    update = {}
    for m, module in MODALITIES.items():
        encoder = getattr(model_params.encoders, m, None) if model_params else None
        if hasattr(params, m) and any(pq.read_table(p, columns=[f"{m}_available"]).column(0).to_numpy().any()
                                      for p in files):
            update[m] = module.resolve_preprocess(getattr(params, m), encoder, train_info(files, m, module))[0]
    return params.model_copy(update=update)


def train_info(files: list[Path], modality: str, module) -> dict[str, np.ndarray]:
    """Clean's facts of each available train item of ``modality`` (its INFO_COLUMNS: image width and
    height, audio seconds, ...), read from the clean part files' columns only: what ``auto`` follows."""
    found: dict[str, list] = {key: [] for key in module.INFO_COLUMNS}
    for path in files:
        present = set(pq.ParquetFile(path).schema_arrow.names)
        named = {key: f"{modality}_{key}" for key in module.INFO_COLUMNS if f"{modality}_{key}" in present}
        part = pq.read_table(path, columns=["split", f"{modality}_available", *named.values()]).to_pydict()
        keep = [split == "train" and ok for split, ok in zip(part["split"], part[f"{modality}_available"])]
        for key, name in named.items():
            found[key] += [v for v, k in zip(part[name], keep) if k and v is not None]
    return {key: np.asarray(values) for key, values in found.items()}


def featurise(source: Source, modality: str, params, out_dir: Path, device: str, shards: range | None = None,
              ) -> tuple[list, dict[int, tuple[str, str]]]:
    """Write the shard files of ``shards`` (all: None) to ``out_dir``; return the train statistics of
    each task, in task order (None where a task has none), and the items that did not decode."""
    lo, hi = (0, source.total) if shards is None else (shards.start * params.shard_rows,
                                                        min(shards.stop * params.shard_rows, source.total))
    tasks = [t for t in plan_tasks(source.files, params.batch_rows, params.shard_rows) if lo <= t.first < hi]
    runner = Runner(source.features, modality, out_dir, params.shard_rows, source.total, device)
    partials, failed = [], {}  # failed: clean items this featurizer could not decode: made unavailable
    # Threads, not processes: the heavy parts (decoders, FFT, BLAS, CUDA kernels) run without the
    # GIL, and threads start instantly and share the shard buffers (measured 1.8x on 2 cores for
    # audio). On CUDA they overlap decoding with the GPU's work. BLAS is held to one thread per
    # worker so that workers do not oversubscribe the cores.
    workers = worker_count(params.workers)
    with threadpool_limits(1), cf.ThreadPoolExecutor(workers) as pool, \
            tqdm(total=hi - lo, desc=f"preprocess {modality}", unit="sample", disable=None) as progress:
        for task, (partial, task_failed) in zip(tasks, pool.map(runner, tasks)):
            partials.append(partial)
            failed |= task_failed
            runner.write_done(task.first + task.stop - task.start)
            progress.update(task.stop - task.start)
    runner.write_done(hi)  # whatever is still buffered
    return partials, failed


def clean_digest(source: Source) -> str:
    """The content of data/clean (its part files, byte for byte): partitions and their join must have
    read the very same data, not only as many samples with the same labels."""
    digest = hashlib.blake2b(digest_size=16)
    for path in source.files:
        with open(path, "rb") as fh:
            digest.update(path.name.encode() + b"\0" + hashlib.file_digest(fh, "blake2b").digest())
    return digest.hexdigest()


def part_record(source: Source, modality: str, params, part: int, parts: int, data: str) -> dict:
    """What a partition must share with the run that joins it: data (``data``: ``clean_digest``),
    settings and its place."""
    settings = {"cfg": source.cfg.model_dump(mode="json") if hasattr(source.cfg, "model_dump") else str(source.cfg),
                "shard_rows": params.shard_rows, "features": source.features.state()}
    return {"modality": modality, "part": part, "parts": parts, "samples": source.total,
            "labels": source.dataset["labels"], "data": data,
            "settings": hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]}


def preprocess_part(modality: str, params, clean_dir: Path, out_dir: Path, part: int,
                    model_params=None) -> dict[str, Any]:
    """Partition ``part`` of ``len(params.partitions)``: its shards, statistics and failures in ``out_dir``."""
    started = time.perf_counter()
    parts = len(params.partitions)
    if part not in params.partitions:
        raise PipelineError(f"partition {part}: preprocess.partitions is {params.partitions}")
    source = open_source(modality, params, clean_dir, model_params)
    record = {"modality": modality, "part": part, "parts": parts, "enabled": source.features is not None}
    if source.features is not None:
        shards = part_shards(source.total, params.shard_rows, part, parts)
        device = resolve_device(params.device, "preprocess.device") if source.features.gpu else "cpu"
        partials, failed = featurise(source, modality, params, out_dir, device, shards)
        np.savez(out_dir / PART_STATS, **{f"{k}.{i}": v for k, partial in enumerate(partials) if partial is not None
                                          for i, v in enumerate(partial)}, tasks=np.int64(len(partials)))
        record |= part_record(source, modality, params, part, parts, clean_digest(source)) | {
            "shards": [shards.start, shards.stop], "failed": {str(row): list(v) for row, v in sorted(failed.items())},
            "seconds": round(time.perf_counter() - started, 3)}
    write_json_atomic(out_dir / PART_FILE, record)
    return record


def join_parts(source: Source, modality: str, params, parts_dir: Path, out_dir: Path,
               ) -> tuple[list, dict[int, tuple[str, str]]]:
    """The partitions' shard files into ``out_dir``; their statistics (in task order) and failures."""
    partials, failed, covered = [], {}, 0
    data = clean_digest(source)  # once, not per partition: it reads all of data/clean
    for part in params.partitions:
        folder = parts_dir / str(part)
        try:
            record = json.loads((folder / PART_FILE).read_text())
        except (OSError, ValueError):
            raise PipelineError(f"{folder}: no partition record (run the preprocess-part@{modality}-{part} stage)")
        expected = part_record(source, modality, params, part, len(params.partitions), data)
        if any(record.get(key) != value for key, value in expected.items()) or record.get("shards", [0])[0] != covered:
            raise PipelineError(f"{folder}: built from other data or settings than this run "
                                f"(re-run the preprocess-part@{modality}-{part} stage)")
        try:
            for shard in range(*record["shards"]):
                for name in source.features.arrays:
                    shutil.copyfile(shard_path(folder, name, shard), shard_path(out_dir, name, shard))
            with np.load(folder / PART_STATS) as stats:
                partials += [(stats[f"{k}.0"], stats[f"{k}.1"], int(stats[f"{k}.2"])) if f"{k}.0" in stats else None
                             for k in range(int(stats["tasks"]))]
        except (OSError, ValueError, KeyError) as exc:  # a file of the partition missing or damaged
            where = getattr(exc, "filename", None) or folder / PART_STATS
            raise PipelineError(f"{where}: missing or unreadable ({getattr(exc, 'strerror', None) or type(exc).__name__}; "
                                f"re-run the preprocess-part@{modality}-{part} stage)") from None
        covered = record["shards"][1]
        failed |= {int(row): tuple(v) for row, v in record["failed"].items()}
    if covered != shard_count(source.total, params.shard_rows):
        raise PipelineError(f"{parts_dir}: the partitions cover {covered} shards of "
                            f"{shard_count(source.total, params.shard_rows)}")
    return partials, failed


def preprocess(modality: str, params, clean_dir: Path, out_dir: Path, model_params=None,
               parts_dir: Path | None = None) -> dict[str, Any]:
    """Write ``out_dir`` for ``modality`` from ``clean_dir``; return the metrics. ``model_params`` (the
    ``model`` section) builds the backbone whose output ``preprocess.<m>.embed`` caches. With
    ``params.partitions``, the shards come from the partitions in ``parts_dir`` (``preprocess_part``)."""
    started = time.perf_counter()
    source = open_source(modality, params, clean_dir, model_params)
    dataset, files, total, cfg, features, choices = source
    if features is None:
        # the data has none of it (a user's data without audio, say): a cheap no-op, and every later
        # stage leaves the modality out (the loader reads ``enabled``)
        print(f"preprocess {modality}: no sample has this modality: not a model input")
        write_json_atomic(out_dir / STATE_FILE, {"modality": modality, "enabled": False, "samples": total,
                                                 "labels": dataset["labels"], "target": dataset.get("target")})
        return {"modality": modality, "enabled": False, "samples": total, "available": 0, "decode_failed": 0,
                "bytes": 0, "device": "cpu", "seconds": round(time.perf_counter() - started, 3), "samples_per_s": None}
    embed = getattr(cfg, "embed", False)
    if embed and model_params is None:
        raise PipelineError(f"preprocess.{modality}.embed: the model params are needed to build the backbone")
    device = resolve_device(params.device, "preprocess.device") if features.gpu else "cpu"
    if params.partitions:
        if parts_dir is None:
            raise PipelineError(f"preprocess.partitions is {params.partitions}: the partitions' folder is needed")
        partials, failed = join_parts(source, modality, params, parts_dir, out_dir)
    else:
        partials, failed = featurise(source, modality, params, out_dir, device)
    stats = None
    if features.stats:
        stats = RunningStats()
        for partial in partials:  # in task order: the same sums however the tasks were run
            stats.add(partial)
    shards = shard_count(total, params.shard_rows)

    label_index = {label: i for i, label in enumerate(dataset["labels"])}
    index = {name: [] for name in INDEX_SCHEMA.names}
    for path in files:
        part = pq.read_table(path, columns=["sample_id", "split", "label", f"{modality}_available"]).to_pydict()
        index["sample_id"] += part["sample_id"]
        index["split"] += part["split"]
        index["label"] += part["label"]
        index["available"] += part[f"{modality}_available"]
    for row, (sample_id, reason) in sorted(failed.items()):
        index["available"][row] = False
        print(f"preprocess {modality}: warning: sample {sample_id}: {reason} (made unavailable)")
    positions = np.arange(total)
    index["label_index"] = [label_index.get(label, -1) for label in index["label"]]  # -1: not a class
    index["shard"], index["row"] = (positions // params.shard_rows).tolist(), (positions % params.shard_rows).tolist()
    pq.write_table(pa.table(index, schema=INDEX_SCHEMA), out_dir / INDEX_FILE, compression="zstd")
    state = {"modality": modality, "enabled": True, "samples": total, "shard_rows": params.shard_rows,
             "shards": shards, "labels": dataset["labels"], "target": dataset.get("target"),
             "arrays": {name: {"shape": list(shape), "dtype": np.dtype(dtype).name}
                        for name, (shape, dtype) in features.arrays.items()},
             "array_order": list(features.arrays),  # JSON is written with sorted keys: the order, kept
             **features.state()}
    if stats is not None:
        state["mean"], state["std"] = stats.result()
        state["stats_of"] = {"array": features.stats[0], "reduced_axes": list(features.stats[1]),
                             "scale": features.stats[2]}
    features.save(out_dir)
    embedding = None
    if embed:  # torch only here: the other modalities' preprocess never imports it
        from mmpipe.features.embed import cache_embeddings

        state["embedding"], embedding = cache_embeddings(
            modality, state, out_dir, np.asarray(index["available"], bool), model_params, params.embed_batch,
            resolve_device(params.device, "preprocess.device"))
    write_json_atomic(out_dir / STATE_FILE, state)

    seconds = time.perf_counter() - started
    available = sum(index["available"])
    return {
        "modality": modality,
        "enabled": True,
        "samples": total,
        "available": available,
        "decode_failed": len(failed),  # kept by clean yet not decodable here: listed, made unavailable
        "decode_failed_samples": {sid: reason for sid, reason in sorted(failed.values())[:100]},
        "splits": dict(collections.Counter(index["split"])),
        "bytes": sum(shard_path(out_dir, name, k).stat().st_size for name in features.arrays for k in range(shards)),
        "device": device,
        "partitions": len(params.partitions),
        "auto": choices,  # settings left to auto and what they resolved to, with why
        "seconds": round(seconds, 3),
        "samples_per_s": round(total / seconds, 1) if seconds > 0 else None,
        **({"embedding": embedding} if embedding else {}),
    }
