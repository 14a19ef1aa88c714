"""clean: validate every modality of every sample, deduplicate, assign splits.

Two streaming passes, so memory stays bounded by a batch whatever the corpus size:

1. validate + normalise each sample (in worker processes) into a temporary Parquet file, keeping
   only a small key table (id, label, group, split, content hashes) in memory;
2. decide, on that key table, the duplicates, conflicting labels, too-small classes and splits,
   then stream the temporary file into the final ``samples/part-*.parquet`` files.

Nothing is dropped silently: every rejected modality or sample is a row of ``rejects.parquet``
(sample id, source row, modality, code, reason, reference, action) and is counted in metrics.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import itertools
import json
import multiprocessing
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mmpipe.errors import PipelineError
from mmpipe.io import ROW_GROUP_ROWS, PartWriter, bounded_slices, iter_row_groups, worker_count, write_json_atomic
from mmpipe.modalities import MODALITIES, names
from mmpipe.names import DATASET_FILE, DECLARED_FILE, REJECTS_FILE, SAMPLES_DIR
from mmpipe.modalities.portable import RejectedInput, describe
from mmpipe.targets import UNLABELLED, BadTarget, Target, target_of

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
_PASS1_FILE = ".validated.parquet"

REJECT_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string()),
    pa.field("source_row", pa.int64()),
    pa.field("modality", pa.string()),  # a modality, or label/split/sample for whole-sample problems
    pa.field("code", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("ref", pa.string()),
    pa.field("action", pa.string()),  # sample_rejected | modality_dropped | value_dropped (a record's cell)
])


def clean_schema() -> pa.Schema:
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("group", pa.string()),
        pa.field("condition", pa.string()),
    ]
    for m, module in MODALITIES.items():
        fields += [pa.field(m, module.STORED_AS), pa.field(f"{m}_available", pa.bool_(), nullable=False)]
        fields += [pa.field(f"{m}_{k}", t) for k, t in module.INFO_COLUMNS.items()]
    return pa.schema(fields)


def _pass1_schema() -> pa.Schema:
    return clean_schema().set(clean_schema().get_field_index("split"), pa.field("split", pa.string()))


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def split_of(key: str, seed: int, fractions) -> str:
    """Deterministic split from a sample's id (or group): stable when data is added or reordered."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2.0**64
    if u < fractions.train:
        return "train"
    return "val" if u < fractions.train + fractions.val else "test"


# --------------------------------------------------------------------------- pass 1: per sample


def validate_sample(row: dict[str, Any], params, target: Target | None = None) -> dict[str, Any]:
    """Validate one raw row against the clean params and the declared ``target`` (None: one class per
    sample). Returns the normalised row, its rejects and its content keys."""
    sid, source_row = row["sample_id"], row["source_row"]
    rejects: list[dict[str, Any]] = []
    out: dict[str, Any] = {"sample_id": sid, "source_row": source_row, "group": row.get("group"),
                           "condition": row.get("condition")}
    flags = {"label_stripped": False, "converted": [], "truncated": False}

    def reject(modality: str, code: str, reason: str, ref: str | None = None, action: str | None = None) -> None:
        rejects.append({"sample_id": sid, "source_row": source_row, "modality": modality, "code": code,
                        "reason": reason, "ref": ref, "action": action})

    raw_label = row.get("label")
    try:  # the canonical text of the target cell; "" (UNLABELLED): kept without a target
        label = (target or target_of(None)).parse(raw_label)
    except BadTarget as exc:
        reject("label", exc.code, exc.reason)
        label = UNLABELLED
    flags["label_stripped"] = (target is None or target.NAME == "category") and raw_label is not None \
        and label not in (raw_label, UNLABELLED)
    out["label"] = label

    split = None
    if row.get("split") is not None:
        split = SPLIT_ALIASES.get(str(row["split"]).strip().lower())
        if split is None:
            reject("split", "split_invalid", f"split {row['split']!r} is not one of train/val/test")
    out["split"] = split

    key_parts = []
    for m, module in MODALITIES.items():
        content, ref, error = row.get(m), row.get(f"{m}_ref"), row.get(f"{m}_error")
        key_parts.append(_digest(content) if content is not None else f"ref:{ref}" if ref else "")
        out[m], out[f"{m}_available"] = None, False
        out.update({f"{m}_{k}": None for k in module.INFO_COLUMNS})
        if error:  # collect writes "<code>: <reason>"
            code, _, reason = error.partition(": ")
            reject(m, code, reason, ref)
            continue
        if content is None:
            continue  # absent by design: any modality may be missing
        try:
            cleaned = module.clean(content, getattr(params, m))
        except RejectedInput as exc:
            reject(m, exc.code, exc.message, ref)
            continue
        except Exception as exc:  # unforeseen (the decoders map what they raise): still this item's problem only
            reject(m, f"{m}_error", f"{m} could not be processed: {describe(exc)}", ref)
            continue
        for code, reason in cleaned.dropped:  # the item is kept without these parts (a record's bad cells)
            reject(m, code, reason, ref, action="value_dropped")
        out[m] = cleaned.data.decode("utf-8") if module.STORED_AS == pa.string() else cleaned.data
        out[f"{m}_available"] = True
        out.update({f"{m}_{k}": cleaned.info.get(k) for k in module.INFO_COLUMNS})
        if cleaned.converted:
            flags["converted"].append(m)
        if cleaned.info.get("truncated"):
            flags["truncated"] = True

    modality_rejects = [r for r in rejects if r["modality"] in MODALITIES and r["action"] is None]
    sample_problem = any(r["modality"] not in MODALITIES for r in rejects)
    if not sample_problem and not any(out[f"{m}_available"] for m in names()):
        reject("sample", "no_usable_modality", "no modality is usable")
        sample_problem = True
    if not sample_problem and modality_rejects and params.on_bad_modality == "drop_sample":
        reject("sample", "bad_modality", "a modality is unusable and clean.on_bad_modality=drop_sample")
        sample_problem = True
    for r in rejects:
        if sample_problem or r["action"] is None:
            r["action"] = "sample_rejected" if sample_problem else "modality_dropped"
    return {"row": None if sample_problem else out, "rejects": rejects, "flags": flags,
            "content_key": "|".join(key_parts), "label": label}


def _validate_batch(rows: list[dict[str, Any]], params, target: Target | None = None) -> list[dict[str, Any]]:
    return [validate_sample(r, params, target) for r in rows]


def _raw_batches(raw_dir: Path, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    files = sorted(raw_dir.glob("part-*.parquet"))
    if not files:
        raise PipelineError(f"{raw_dir}: no part-*.parquet files (run the collect stage first)")
    for path in files:
        for table in iter_row_groups(path):
            for batch in bounded_slices(table, batch_rows):  # in flight: 2 per worker, so bytes matter
                yield batch.to_pylist()


def _spawn_pool(workers: int) -> cf.ProcessPoolExecutor:
    # spawn: the parent holds pyarrow threads, which fork does not copy safely
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _validated_batches(raw_dir: Path, params, validate=_validate_batch) -> Iterator[list[dict[str, Any]]]:
    """Validate batches in worker processes, in order, with a bounded number in flight.

    A worker process that dies (a decoder crashing in C, the OS killing it) takes the batches in
    flight with it: those are validated again by ``_isolated``, which finds the item at fault and
    rejects it, and the rest of the data continues in a new pool. ``validate`` is the per-batch
    function (tests pass one that crashes).
    """
    workers = worker_count(params.workers)
    batches = _raw_batches(raw_dir, params.batch_rows)
    if workers == 1:
        for rows in batches:
            yield validate(rows, params)
        return
    pool = _spawn_pool(workers)
    pending: collections.deque[tuple[list, cf.Future | None]] = collections.deque()
    try:
        for rows in itertools.chain(batches, [None]):
            if rows is not None:
                try:
                    future = pool.submit(validate, rows, params)
                except BrokenProcessPool:  # a worker died under an earlier batch before this one went out
                    future = None
                pending.append((rows, future))
            while pending and (rows is None or len(pending) >= 2 * workers or pending[-1][1] is None):
                try:
                    if pending[0][1] is None:
                        raise BrokenProcessPool("the pool broke before this batch was submitted")
                    yield pending[0][1].result()
                    pending.popleft()
                except BrokenProcessPool:
                    pool.shutdown(cancel_futures=True)
                    while pending:
                        yield _isolated(pending.popleft()[0], params, validate)
                    pool = _spawn_pool(workers)
    finally:
        pool.shutdown(cancel_futures=True)


def _isolated(rows: list[dict[str, Any]], params, validate) -> list[dict[str, Any]]:
    """Validate ``rows`` in a fresh process; when it dies, halve the rows and retry each half, down to
    the one sample that kills its process; there, the modality whose decoder crashes is rejected
    (``decoder_crashed``) and the rest of the sample is validated as usual."""
    with _spawn_pool(1) as pool:
        try:
            return pool.submit(validate, rows, params).result()
        except BrokenProcessPool:
            pass
    if len(rows) > 1:
        middle = len(rows) // 2
        return _isolated(rows[:middle], params, validate) + _isolated(rows[middle:], params, validate)
    row = dict(rows[0])
    for m in names():
        if row.get(m) is None:
            continue
        alone = {**row, **{other: None for other in names() if other != m}}
        with _spawn_pool(1) as pool:
            try:
                pool.submit(validate, [alone], params).result()
                continue
            except BrokenProcessPool:
                pass
        print(f"clean: warning: sample {row['sample_id']}: the {m} decoder crashed its worker process; "
              f"{m} rejected (decoder_crashed)")
        row[m], row[f"{m}_error"] = None, f"decoder_crashed: the {m} decoder crashed (killed its process) on this file"
    if row == rows[0]:  # no modality crashes alone: the sample as a whole is rejected
        return [{"row": None, "flags": {"label_stripped": False, "converted": [], "truncated": False},
                 "rejects": [{"sample_id": row["sample_id"], "source_row": row["source_row"], "modality": "sample",
                              "code": "decoder_crashed", "reason": "validating this sample crashed its worker process",
                              "ref": None, "action": "sample_rejected"}]}]
    return _isolated([row], params, validate)


# --------------------------------------------------------------------------- decisions on the key table


def _decide(keys: list[dict[str, Any]], params, classes: bool = True) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """Given the surviving samples' keys (in source order), return {position: split} and new rejects.
    ``classes``: the target is a class (clean.min_per_class applies). Identical content with different
    targets is rejected; with the same target (or one labelled and one not), the first labelled copy stays."""
    rejected: dict[int, tuple[str, str]] = {}

    by_content: dict[str, list[int]] = collections.defaultdict(list)
    for pos, k in enumerate(keys):
        by_content[k["content_key"]].append(pos)
    for positions in by_content.values():
        if len(positions) < 2:
            continue
        labels = {keys[p]["label"] for p in positions} - {UNLABELLED}
        if len(labels) > 1:
            ids = ", ".join(keys[p]["sample_id"] for p in positions[:5])
            for p in positions:
                rejected[p] = ("conflicting_labels", f"identical content has different labels {sorted(labels)} ({ids})")
        else:
            keeper = next((p for p in positions if keys[p]["label"] != UNLABELLED), positions[0])
            for p in positions:
                if p != keeper:
                    rejected[p] = ("duplicate", f"exact duplicate of sample {keys[keeper]['sample_id']}")

    seen_ids: dict[str, int] = {}
    for pos, k in enumerate(keys):
        if pos in rejected:
            continue
        if k["sample_id"] in seen_ids:
            rejected[pos] = ("duplicate_id", f"sample id already used by source row {keys[seen_ids[k['sample_id']]]['source_row']}")
        else:
            seen_ids[k["sample_id"]] = pos

    counts = collections.Counter(k["label"] for pos, k in enumerate(keys) if pos not in rejected)
    small = {label for label, n in counts.items() if n < params.min_per_class and label != UNLABELLED} if classes else set()
    for pos, k in enumerate(keys):
        if pos not in rejected and k["label"] in small:
            rejected[pos] = ("class_too_small", f"class {k['label']!r} has {counts[k['label']]} samples "
                                                f"< clean.min_per_class={params.min_per_class}")

    splits = {}
    for pos, k in enumerate(keys):
        if pos not in rejected:
            splits[pos] = k["split"] or split_of(k["group"] or k["sample_id"], params.seed, params.split)
    new_rejects = [{"sample_id": keys[p]["sample_id"], "source_row": keys[p]["source_row"], "modality": "sample",
                    "code": code, "reason": reason, "ref": None, "action": "sample_rejected"}
                   for p, (code, reason) in sorted(rejected.items())]
    return splits, new_rejects


# --------------------------------------------------------------------------- rules decided over all items


def _raw_items(raw_dir: Path, modality: str) -> Iterator[bytes]:
    for path in sorted(raw_dir.glob("part-*.parquet")):
        for table in iter_row_groups(path, [modality]):
            yield from (v for v in table.column(0).to_pylist() if v is not None)


def declarations(raw_dir: Path) -> dict[str, Any]:
    """What collect recorded of the user's data declarations (``declared.json``): the target, each record
    modality's data params."""
    path = raw_dir / DECLARED_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_rules(params, raw_dir: Path):
    """``params`` with the rules each modality decides over all raw items first (``resolve_rules``:
    e.g. the types of tabular columns left to ``auto``; by default the rules as they are, no item
    read), from what collect recorded of the user's declarations (``declared.json``)."""
    declared = declarations(raw_dir)
    updates = {m: module.resolve_rules(getattr(params, m), declared.get(m, {}), _raw_items(raw_dir, m))
               for m, module in MODALITIES.items()}
    return params.model_copy(update=updates)


# --------------------------------------------------------------------------- entry point


def _target_summary(target: Target, per_value: dict[str, collections.Counter]) -> dict[str, Any]:
    """metrics/clean.json's view of a number or set target: its fitted state's headline figures."""
    state = {k: v for k, v in target.state.items() if k not in ("thresholds", "train_count", "pos_weight")}
    if target.NAME == "set":
        state["tags"] = len(target.state["tags"])
        state["empty_sets"] = sum(c[s] for v, c in per_value.items() if v == "[]" for s in SPLITS)
    return {"type": target.NAME, "column": target.spec.get("column", "label"), **state}


def clean(params, raw_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Validate ``raw_dir`` into ``out_dir`` (samples/part-*.parquet, rejects.parquet, dataset.json); return metrics."""
    started = time.perf_counter()
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in sorted(raw_dir.glob("part-*.parquet")))
    params = resolve_rules(params, raw_dir)
    target = target_of(declarations(raw_dir).get("target"))
    pass1_path = out_dir / _PASS1_FILE
    pass1_schema = _pass1_schema()
    rejects: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    counters = collections.Counter()
    converted = collections.Counter()
    with pq.ParquetWriter(pass1_path, pass1_schema, compression="none") as pass1, \
            tqdm(total=total, desc="clean", unit="sample", disable=None) as progress:
        for results in _validated_batches(raw_dir, params, functools.partial(_validate_batch, target=target)):
            kept_rows = []
            for res in results:
                rejects.extend(res["rejects"])
                counters["label_stripped"] += res["flags"]["label_stripped"]
                counters["truncated"] += res["flags"]["truncated"]
                converted.update(res["flags"]["converted"])
                row = res["row"]
                if row is not None:
                    kept_rows.append(row)
                    keys.append({"sample_id": row["sample_id"], "source_row": row["source_row"], "label": row["label"],
                                 "group": row["group"], "split": row["split"], "content_key": res["content_key"]})
            if kept_rows:
                pass1.write_table(pa.Table.from_pylist(kept_rows, schema=pass1_schema), row_group_size=ROW_GROUP_ROWS)
            progress.update(len(results))

    splits, late_rejects = _decide(keys, params, classes=target.NAME == "category")
    rejects.extend(late_rejects)
    if not splits:
        raise PipelineError(f"clean: no sample survived validation ({len(rejects)} rejects; see the rejects table)")

    schema = clean_schema()
    (out_dir / SAMPLES_DIR).mkdir()
    writer = PartWriter(out_dir / SAMPLES_DIR, schema, rows_per_file=50_000)
    per_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unlabelled: collections.Counter[str] = collections.Counter()
    unlabelled_ids: list[str] = []
    train_cells: list[str] = []
    available = collections.Counter()
    pos = 0
    for table in iter_row_groups(pass1_path):
        keep_positions = [p for p in range(pos, pos + table.num_rows) if p in splits]
        mask = pa.array([p in splits for p in range(pos, pos + table.num_rows)])
        pos += table.num_rows
        if not keep_positions:
            continue
        table = table.filter(mask)
        split_column = pa.array([splits[p] for p in keep_positions], pa.string())
        table = table.set_column(table.schema.get_field_index("split"), pa.field("split", pa.string(), nullable=False),
                                 split_column).cast(schema)
        writer.write(table)
        for sid, label, split in zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist(),
                                     split_column.to_pylist()):
            if label == UNLABELLED:
                unlabelled[split] += 1
                unlabelled_ids.append(sid)
                continue
            per_class[label][split] += 1
            if split == "train":
                train_cells.append(label)
        for m in names():
            available[m] += sum(table.column(f"{m}_available").to_pylist())
    writer.close()
    pass1_path.unlink()

    reject_table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
    pq.write_table(reject_table, out_dir / REJECTS_FILE, compression="zstd")

    split_counts = {s: sum(c[s] for c in per_class.values()) + unlabelled[s] for s in SPLITS}
    rejected_ids = {r["sample_id"] + "\0" + str(r["source_row"]) for r in rejects if r["action"] == "sample_rejected"}
    try:  # the target's state, learnt on the labelled train rows only (the classes: every kept one)
        target = target.fitted(target.fit(train_cells, list(per_class)))
    except ValueError as exc:
        raise PipelineError(f"clean: data.target ({target.NAME}, column {target.spec.get('column', 'label')!r}): "
                            f"{exc}") from None
    is_category = target.NAME == "category"
    labels = sorted(per_class) if is_category else target.state.get("tags", [])
    warnings = [f"class {label!r} has no {s} samples" for label in labels for s in SPLITS
                if is_category and per_class[label][s] == 0 and split_counts[s] > 0]
    if unlabelled_ids:
        shown = ", ".join(unlabelled_ids[:5]) + (f" and {len(unlabelled_ids) - 5} more" if len(unlabelled_ids) > 5 else "")
        print(f"clean: {len(unlabelled_ids)} samples have no target: kept unlabelled, out of supervised training "
              f"and evaluation ({shown})")
    for w in warnings:
        print(f"clean: warning: {w}")
    # what later stages (and the deployment bundle) must reproduce of clean's normalisation
    dataset = {"labels": labels, "modalities": list(names()),
               # clean's per-item rules (bounds included): the featurizers and the bundle's predictor follow them
               "clean_rules": {m: getattr(params, m).model_dump(mode="json") for m in names()},
               "samples": writer.rows, "splits": split_counts, "files": writer.files}
    dataset["target"] = target.describe()  # type, options, the state fitted on train: every later stage's target
    if unlabelled_ids:
        dataset["unlabelled"] = {s: unlabelled[s] for s in SPLITS}
    write_json_atomic(out_dir / DATASET_FILE, dataset)
    seconds = time.perf_counter() - started
    return {
        "samples_in": total,
        "kept": writer.rows,
        "rejected_samples": len(rejected_ids),
        "reject_rows": len(rejects),
        "rejects_by_code": dict(sorted(collections.Counter(r["code"] for r in rejects).items())),
        "rejects_by_modality": dict(sorted(collections.Counter(r["modality"] for r in rejects).items())),
        "available": {m: available[m] for m in names()},
        "converted": {m: converted[m] for m in names()},
        "labels_stripped": counters["label_stripped"],
        "truncated": counters["truncated"],
        "split": split_counts,
        "per_class": {label: {s: per_class[label][s] for s in SPLITS} for label in labels} if is_category else {},
        "unlabelled": {s: unlabelled[s] for s in SPLITS},
        **({} if is_category else {"target": _target_summary(target, per_class)}),
        "warnings": len(warnings),
        "seconds": round(seconds, 3),
        "samples_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }
