"""Writing the tokenized cache: each source's clean rows → arrow → batched tokenization → one complete entry.

Runs before any rank exists (`launch prepare`, or `launch` itself, a Slurm node's agent, a Ray task: see
launcher/commands/prepare.py), so tokenization never runs on the clock of a collective. For each source
whose entry is missing: its rows are streamed through the same Cleaner as the checks (checking again that
its bytes are the ones the plan keyed, so a file changed since is refused), written to an arrow file, and
tokenized by `datasets.map(batched=True, num_proc=N)` calling the task's batched hook (TaskHooks.
tokenize_batch: one fast-tokenizer call per batch). The result, the seeded carve's index arrays and a
manifest (rows, tokens and label counts per part) go into a temporary folder renamed into place when
complete. One writer per entry: a file lock beside it, which the other processes (other nodes on a shared
cache folder) wait on; never a collective.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from launcher.config.recipe import Recipe, SourceConfig
from launcher.errors import Problem, RecipeError
from launcher.planning.data_cache import MANIFEST, DataPlan, SourcePlan, carves, entry_key, manifest
from launcher.planning.data_files import SourceCheck, clean_batches, split_indices
from launcher.planning.readers import Fingerprint
from launcher.planning.sources import resolve
from launcher.train import drills

LARGE = 50_000  # rows from which tokenizing in several processes pays for starting them
MAP_BATCH = 1000  # rows per batched tokenizer call


def source_config(recipe: Recipe, entry: SourcePlan) -> SourceConfig:
    return recipe.data.train[entry.index] if entry.split == "train" else getattr(recipe.data, entry.split)


class Progress:
    """Rows/s and ETA of a long pass: a bar on a terminal, a plain line every 30 s in a log."""

    def __init__(self, what: str, total_bytes: int | None, say: Callable[[str], None]):
        self.what, self.total, self.say = what, total_bytes, say
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, leave=False)

    def update(self, rows: int, done_bytes: int, step_bytes: int) -> None:
        now = time.monotonic()
        rate = rows / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(step_bytes)
            self.bar.set_postfix_str(f"{rows:,} rows, {rate:,.0f} rows/s")
        elif now - self.last >= 30:
            self.last = now
            eta = ""
            if self.total:
                left = (now - self.start) * (self.total - done_bytes) / max(done_bytes, 1)
                eta = f", {done_bytes / self.total:.0%}, ETA {left:.0f} s"
            self.say(f"{self.what}: {rows:,} rows ({rate:,.0f} rows/s{eta})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Counting:
    """A Fingerprint that also counts the bytes through it (for the progress bar)."""

    def __init__(self, fingerprint: Fingerprint):
        self.fingerprint, self.bytes = fingerprint, 0

    def add(self, text: str) -> None:
        self.fingerprint.add(text)

    def update(self, data: bytes) -> None:
        self.bytes += len(data)
        self.fingerprint.update(data)


def write_rows(recipe: Recipe, entry: SourcePlan, tokenizer_key: str, path: Path, say) -> int:
    """The source's clean rows into an arrow file; checks the bytes read give the key the plan has."""
    import pyarrow as pa

    resolved = resolve(source_config(recipe, entry), entry.split)
    fingerprint = _Counting(Fingerprint(*resolved.identity()))
    progress = Progress(f"reading {entry.split} {entry.label}", sum(f.size or 0 for f in resolved.files), say)
    writer, schema, rows, seen = None, None, 0, 0
    try:
        for batch in clean_batches(recipe, resolved, fingerprint):
            if not batch:
                continue
            table = pa.Table.from_pylist(batch, schema=schema)
            if writer is None:
                schema = table.schema
                writer = pa.ipc.new_stream(str(path), schema)
            writer.write_table(table)
            rows += len(batch)
            progress.update(rows, fingerprint.bytes, fingerprint.bytes - seen)
            seen = fingerprint.bytes
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    check = SourceCheck(entry.split, entry.index, entry.label, rows, entry.dropped, fingerprint.fingerprint.hexdigest())
    if entry_key(recipe, check, tokenizer_key) != entry.key:
        raise RecipeError(
            "data",
            [Problem(f"data.{entry.split}", f"{entry.label} changed since the checks before launch; launch again")],
        )
    return rows


def load_table(folder: Path, files: list[str]):
    """An entry's tokenized rows: its arrow files memory-mapped (nothing is read until a row is asked for)."""
    import pyarrow as pa

    tables = [pa.ipc.open_stream(pa.memory_map(str(folder / name))).read_all() for name in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def token_lengths(table) -> np.ndarray:
    """Tokens of each row, from the arrow offsets (no row is read): len(input_ids), or for a pair task the
    chosen and rejected sequences together."""
    import pyarrow.compute as pc

    names = [name for name in table.column_names if name.endswith("input_ids") and not name.startswith("decoder")]
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in names:
        total += pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
    return total


def _part_facts(table, indices: np.ndarray | None, recipe: Recipe) -> dict:
    """Rows, tokens and (class and tag labels) rows per class of one part of an entry."""

    from launcher.planning.data_files import label_counts

    lengths = token_lengths(table)
    rows = len(indices) if indices is not None else table.num_rows
    facts = {"rows": int(rows), "tokens": int(lengths[indices].sum() if indices is not None else lengths.sum())}
    kind, classes = recipe.task.spec.label, recipe.task.resolved_num_labels
    if kind == "class":
        labels = table.column("labels").to_numpy(zero_copy_only=False)
        labels = labels[indices] if indices is not None else labels
        facts["label_counts"] = np.bincount(labels, minlength=classes).tolist()
    elif kind == "tags":
        labels = table.column("labels")
        labels = labels.take(np.asarray(indices, dtype=np.int64)) if indices is not None else labels
        facts["label_counts"] = label_counts(labels.to_pylist(), classes)
    return facts


SMALL_INTS = {"attention_mask", "token_type_ids", "special_tokens_mask"}  # 0/1 per token: int8


def features_of(sample: dict[str, list]):
    """Compact arrow types for the hook's output (token ids int32, masks int8, floats float32): half the bytes
    of what datasets infers from Python ints, so half the disk and page cache. None when a column is not a
    scalar or a flat list (datasets then infers)."""
    import datasets

    found = {}
    for name, values in sample.items():
        value = next((v for v in values if v is not None and v != []), None)
        if isinstance(value, list):
            inner = next((v for row in values if row for v in row), None)
            if isinstance(inner, bool) or not isinstance(inner, (int, float)):
                return None
            kind = "float32" if isinstance(inner, float) else "int8" if name in SMALL_INTS else "int32"
            found[name] = datasets.List(datasets.Value(kind))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        else:
            found[name] = datasets.Value("float32" if isinstance(value, float) else "int64")
    return datasets.Features(found)


def build_entry(recipe: Recipe, entry: SourcePlan, tokenizer, tokenizer_key: str, folder: Path, say) -> None:
    """One entry into `folder` (a temporary one; the caller renames it into place)."""
    import datasets

    from launcher.train.tasks import hooks

    folder.mkdir(parents=True)
    started = time.monotonic()
    rows_file = folder / "rows.arrow"
    rows = write_rows(recipe, entry, tokenizer_key, rows_file, say)
    read_s = time.monotonic() - started
    if recipe.data.num_proc is not None:
        num_proc = max(1, min(recipe.data.num_proc, rows))
    else:
        num_proc = min(os.cpu_count() or 1, 16, max(rows // MAP_BATCH, 1)) if rows >= LARGE else 1
    if sys.stderr.isatty():
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    rows_ds = datasets.Dataset.from_file(str(rows_file))
    task = hooks(recipe, tokenizer)
    tokenized = rows_ds.map(
        task.tokenize_batch,
        batched=True,
        batch_size=MAP_BATCH,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=rows_ds.column_names,
        cache_file_name=str(folder / "tokens.arrow"),
        features=features_of(task.tokenize_batch(rows_ds[:16])),
        new_fingerprint=entry.key,
        desc=f"tokenizing {entry.split} {entry.label}",
    )
    files = [Path(f["filename"]).name for f in tokenized.cache_files]
    del tokenized, rows_ds
    rows_file.unlink()
    table = load_table(folder, files)
    parts = {}
    if entry.split == "train" and carves(recipe):
        for part, indices in split_indices(rows, recipe, entry.index).items():
            np.save(folder / f"{part}.npy", indices)
            parts[part] = {"index": f"{part}.npy", **_part_facts(table, indices, recipe)}
    else:
        parts["train" if entry.split == "train" else "all"] = {"index": None, **_part_facts(table, None, recipe)}
    record = {
        "key": entry.key,
        "source": entry.label,
        "split": entry.split,
        "files": files,
        "parts": parts,
        "rows": rows,
        "num_proc": num_proc,
        "read_s": round(read_s, 3),
        "tokenize_s": round(time.monotonic() - started - read_s, 3),
    }
    (folder / MANIFEST).write_text(json.dumps(record, indent=1))


def prepare_cache(recipe: Recipe, data: DataPlan, tokenizer=None, say: Callable[[str], None] = print) -> list[str]:
    """Every missing entry of `data` written (one writer each, the others wait on its lock file); a line per
    source saying what was done."""
    from filelock import FileLock

    from launcher.planning.data_cache import cache_root, tokenizer_fingerprint

    root = cache_root(recipe)  # this machine's (the plan's cache_dir is the launcher's, maybe another machine)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_key, lines, delayed = tokenizer_fingerprint(recipe), [], False
    for entry in data.sources:
        if not entry.key:
            continue
        folder = root / entry.key
        if manifest(folder) is not None:
            lines.append(f"{entry.split} {entry.label}: in the cache ({folder})")
            continue
        lock = FileLock(str(root / f"{entry.key}.lock"))
        started = time.monotonic()
        with lock.acquire(poll_interval=0.5):
            waited = time.monotonic() - started
            if manifest(folder) is not None:  # another process wrote it while this one waited
                lines.append(f"{entry.split} {entry.label}: written by another process ({waited:.0f} s waited)")
                continue
            if tokenizer is None:
                from launcher.train.model import load_tokenizer

                tokenizer = load_tokenizer(recipe)
            if not delayed:  # LAUNCHER_FAULT=phase=prepare,kind=slow: the writer takes that much longer
                drills.delay("prepare")
                delayed = True
            tmp = root / f".{entry.key}.tmp-{socket.gethostname()}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                build_entry(recipe, entry, tokenizer, tokenizer_key, tmp, say)
                if folder.exists():  # a folder without a manifest: an interrupted writer's, never renamed
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        done = manifest(folder)
        seconds = time.monotonic() - started
        lines.append(
            f"{entry.split} {entry.label}: tokenized {done['rows']:,} rows in {seconds:.1f} s "
            f"({done['rows'] / max(seconds, 1e-9):,.0f} rows/s, {done['num_proc']} process(es)) → {folder}"
        )
    return lines
