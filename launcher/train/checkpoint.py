"""Atomic checkpoints, resume and retention.

A checkpoint is written into a hidden temporary folder and renamed into
place by rank 0 only after every rank has finished writing, so a folder named
checkpoint-* is always complete; a crash mid-write leaves only a .tmp folder
that the next save or resume removes. Before the rename rank 0 also writes a
manifest (every file's size, and its SHA-256 unless train.checkpoint_hash is off),
verified before resume, so a checkpoint damaged later (a truncated copy, a
deleted shard, a file swapped in) is found at plan time rather than mid-load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

from launcher.records import CheckpointState, RecordError, write_json_atomic

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


class CheckpointMismatch(Exception):
    """A checkpoint that cannot continue this recipe (different model or task)."""


def fingerprint(recipe) -> dict:
    # LoRA decides the checkpoint's layout (adapter-only states); so does the strategy, which check_compatible
    # compares as planned (`auto` resolved), not as written in the recipe
    return {
        "model": recipe.model.path,
        "task": recipe.task.type,
        "num_labels": recipe.task.resolved_num_labels,
        "global_batch_size": recipe.train.batch_size,
        "lora": recipe.model.lora is not None,
    }


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.glob(f"{PREFIX}*")
        if re.fullmatch(rf"{PREFIX}\d+", p.name) and p.is_dir() and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_resume(run_dir: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume != "auto":
        return Path(resume)
    found = complete(run_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> CheckpointState:
    return CheckpointState.read(folder / STATE_FILE)


def check_compatible(folder: Path, recipe, plan) -> CheckpointState:
    """The checkpoint's state if it can continue this recipe under this plan. The world size may differ: the
    data position is in samples and the global batch is the recipe's, so only the split into micro-batches
    changes (ZeRO states are resharded at load: train.engines). The strategy may not: its states' layout."""
    try:
        state = read_state(folder)
    except RecordError:
        state = None
    if state is None or state.fingerprint is None or state.world_size is None:
        raise CheckpointMismatch(
            f"{folder} is not a readable checkpoint (no valid {STATE_FILE}); point train.resume "
            "at a checkpoint-* folder, or remove it"
        )
    mine = fingerprint(recipe)
    differ = {k: (state.fingerprint.get(k), v) for k, v in mine.items() if state.fingerprint.get(k) != v}
    if differ:
        detail = "; ".join(f"{k}: checkpoint {a!r}, recipe {b!r}" for k, (a, b) in differ.items())
        raise CheckpointMismatch(
            f"{folder} was written by a different run ({detail}). Use another output_dir, "
            "or train.resume=never to start over in a fresh output_dir."
        )
    written = state.plan.get("strategy", plan.strategy)
    if written != plan.strategy:  # `strategy: auto` can choose differently on another number of GPUs
        raise CheckpointMismatch(
            f"{folder} holds {written} states but this launch plans {plan.strategy} "
            f"({plan.world_size} processes); set distributed.strategy={written} to resume "
            f"it (any number of processes works), or train.resume=never in a fresh output_dir"
        )
    return state


def world_size_note(state: CheckpointState, world_size: int) -> str | None:
    """What changes when a checkpoint resumes on another number of processes (None: the same)."""
    if state.world_size == world_size:
        return None
    return (
        f"world size changed: checkpoint written by {state.world_size} processes, resuming on {world_size}; "
        f"same global batch, split into other micro-batches (summation order differs: float rounding only)"
    )


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of a rank that has no saved random state (a rank beyond the checkpoint's world size):
    a function of (seed, step, rank) only, so such a resume is reproducible."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def restore_missing_rng(folder: Path, rank: int, seed: int, step: int) -> bool:
    """Accelerate's load_state restores random_states_{rank}.pkl when present and silently keeps the current
    state when not; a rank the checkpoint had no file for is seeded with rank_seed instead. True if seeded."""
    if (folder / f"random_states_{rank}.pkl").exists():
        return False
    from accelerate.utils import set_seed

    set_seed(rank_seed(seed, step, rank))
    return True


def folder_of(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{step:08d}"


def save(
    accelerator,
    run_dir: Path,
    step: int,
    state: CheckpointState,
    keep_last: int,
    engine=None,
    hash_files: bool = True,
    written: Callable[[], None] | None = None,
    keep: Collection[Path] = (),
) -> Path:
    """Every rank calls this; it returns once the checkpoint is in place. `engine` (train.strategy) adds the
    sharded model and optimizer states that Accelerate does not hold. `written()` runs on each rank once its
    own files are written, before the rename (the failure drill's phase=write). `keep`: checkpoints pruning
    must leave whatever keep_last says (the best one, train.keep_best)."""
    final = folder_of(run_dir, step)
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if engine is not None:
        engine.save(tmp)
    if written is not None:
        written()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state.write(tmp / STATE_FILE)
        write_manifest(tmp, hash_files)
        if final.exists():  # the same step saved again (e.g. end of run after a save_every hit)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
        prune(run_dir, keep_last, keep)
    accelerator.wait_for_everyone()
    return final


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint whose files no longer match the manifest written with it."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, hash_files: bool) -> None:
    """Every file of the checkpoint (all ranks' shards: called after the barrier) with its size and hash."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        entry = {"size": path.stat().st_size}
        if hash_files:
            entry["sha256"] = _sha256(path)
        files[path.relative_to(folder).as_posix()] = entry
    write_json_atomic(folder / MANIFEST_FILE, {"files": files})


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint against its manifest, or None when it is intact. A checkpoint without
    a manifest (written before manifests existed) cannot be checked and is taken as it is."""
    manifest = folder / MANIFEST_FILE
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
        items = [(name, int(entry["size"]), entry.get("sha256")) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, size, digest in items:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated or replaced)"
        if digest is not None and _sha256(path) != digest:
            return f"{name} does not match its SHA-256 in the manifest (corrupted or replaced)"
    return None


def newest_intact(run_dir: Path, resume: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, and a note for each damaged one passed over.

    resume 'auto' falls back from a damaged newest checkpoint to the newest intact one (the damaged folder
    is left as it is, for inspection; the run overwrites it when it reaches that step again); when every
    checkpoint is damaged, or an explicitly named one is, CheckpointDamaged refuses the resume."""
    if resume != "auto":
        found = find_resume(run_dir, resume)
        problem = damage(found) if found is not None else None
        if problem:
            raise CheckpointDamaged(f"{found} is damaged: {problem}.{_older_hint(found.parent, found)}")
        return found, []
    skipped = []
    for folder in reversed(complete(run_dir)):
        problem = damage(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"{folder} is damaged ({problem})")
    if skipped:
        raise CheckpointDamaged(
            f"every checkpoint in {run_dir} is damaged: {'; '.join(skipped)}. Use another "
            "output_dir, or train.resume=never to start over in a fresh output_dir."
        )
    return None, []


def _older_hint(run_dir: Path, damaged: Path) -> str:
    older = [p for p in complete(run_dir) if p != damaged and damage(p) is None]
    if older:
        return f" Resume from an intact one with train.resume={older[-1]}, or remove the damaged folder."
    return " Point train.resume at an intact checkpoint-* folder, or use train.resume=never in a fresh output_dir."


def prune(run_dir: Path, keep_last: int, keep: Collection[Path] = ()) -> None:
    kept = {Path(p).name for p in keep}
    for old in complete(run_dir)[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export(model, tokenizer, final_dir: Path, state_dict: dict | None = None) -> None:
    """The final model as a plain Hugging Face folder (a LoRA model: its adapter), renamed into place when
    complete. `state_dict`: full weights gathered from a sharded model, written instead of its own shards."""
    if state_dict is not None:
        state_dict = _without_aliases(model, state_dict)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def _without_aliases(model, state_dict: dict) -> dict:
    """A gathered state dict holds tied weights (embeddings / LM head) once per name; keep the first name,
    as save_pretrained does for a model's own weights."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return {k: v for k, v in state_dict.items() if k not in aliases}
