"""Atomic checkpoints, resume and retention.

A checkpoint is written into a hidden temporary folder and renamed into
place by rank 0 only after every rank has finished writing (at once, or in
the background: train.background_checkpoint), so a folder named checkpoint-* is
always complete; a crash mid-write leaves only a .tmp folder that the next
save or resume removes. Before the rename rank 0 also writes a
manifest (every file's size, and its SHA-256 unless train.checkpoint_hash is off),
verified before resume, so a checkpoint damaged later (a truncated copy, a
deleted shard, a file swapped in) is found at plan time rather than mid-load.

What a checkpoint may hold is checked before it is loaded (train.unpickling: no pickle naming anything but
tensors and the libraries' state types), and the ranks load it with torch's weights_only loader. Retention
deletes only the launcher's own checkpoint folders (manifest and trainer_state.json inside, no symbolic link)
and its own temporary folders.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

from launcher.records import CheckpointState, write_json_atomic

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


class CheckpointMismatch(Exception):
    """A checkpoint that cannot continue this recipe (different model, task, data or settings)."""


class CheckpointDamaged(CheckpointMismatch):
    """A checkpoint whose files no longer match the manifest written with it."""


class CheckpointUnsafe(CheckpointMismatch):
    """A checkpoint holding a pickle that names a global a checkpoint never needs (it would run code)."""


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


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of a rank that has no saved random state (a rank beyond the checkpoint's world size):
    a function of (seed, step, rank) only, so such a resume is reproducible."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def restore_rng(folder: Path, rank: int, seed: int, step: int) -> bool:
    """This rank's random state from random_states_{rank}.pkl (written by Accelerate's save_state), loaded with
    weights_only and applied; a file that cannot be loaded is an error (Accelerate's own load_state would keep
    the current state without a word). A rank the checkpoint had no file for is seeded with rank_seed instead.
    True if seeded."""
    path = folder / f"random_states_{rank}.pkl"
    if not path.exists():
        from accelerate.utils import set_seed

        set_seed(rank_seed(seed, step, rank))
        return True
    import random

    import numpy as np
    import torch

    try:
        states = torch.load(path, weights_only=True)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception as exc:  # noqa: BLE001 - any failure of the file is reported as what it is
        raise CheckpointDamaged(
            f"{path} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"without it rank {rank} would not continue its random sequence. {_older_hint(folder.parent, folder)}"
        ) from None
    return False


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
    note: Callable[[str], None] | None = None,
    keep: Collection[Path] = (),
) -> Path:
    """Every rank calls this; it returns once the checkpoint is in place. `engine` (train.strategy) adds the
    sharded model and optimizer states that Accelerate does not hold. `written()` runs on each rank once its
    own files are written, before the rename (the failure drill's phase=write). `keep`: checkpoints pruning
    must leave whatever keep_last says (the best one, train.keep_best)."""
    tmp, final = begin(accelerator, run_dir, step)
    try:
        if engine is not None:
            engine.save(tmp)
    except Exception as exc:  # torch, safetensors and DeepSpeed each raise their own type for a full disk
        raise_write_failed(exc, tmp, run_dir, step)
    if written is not None:
        written()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        put_in_place(tmp, final, state, step, keep_last, hash_files, note, keep)
    accelerator.wait_for_everyone()
    return final


def begin(accelerator, run_dir: Path, step: int) -> tuple[Path, Path]:
    """The fresh temporary folder of step's checkpoint, with Accelerate's states (RNG, optimizer) in it."""
    final = folder_of(run_dir, step)
    tmp = run_dir / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        remove_own(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as exc:  # a full disk, said as such (raise_write_failed)
        raise_write_failed(exc, tmp, run_dir, step)
    return tmp, final


def put_in_place(tmp: Path, final: Path, state: CheckpointState, step: int, keep_last: int, hash_files: bool,
                 note: Callable[[str], None] | None = None, keep: Collection[Path] = ()) -> None:  # fmt: skip
    """Rank 0, once every rank's files are in `tmp`: the state and the manifest, then the atomic rename and the
    retention of the run's own checkpoints (`keep`: never pruned)."""
    run_dir = final.parent
    try:
        state.write(tmp / STATE_FILE)
        write_manifest(tmp, hash_files)
    except OSError as exc:
        raise_write_failed(exc, tmp, run_dir, step)
    if final.exists() or final.is_symlink():  # the same step saved again (end of run after a save_every hit)
        remove_own(final)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    prune(run_dir, keep_last, note, keep)


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (most often: the disk is full); the message says where and why."""


DISK_FULL = ("No space left on device", "os error 28", "unexpected pos", "Disk quota exceeded")


def raise_write_failed(exc: Exception, tmp: Path, run_dir: Path, step: int, remove_partial: bool = True):
    """A checkpoint write failed: remove its partial folder (it can never be resumed from); a full disk is said
    plainly with the file system's free space (torch says "[enforce fail at inline_container.cc] unexpected
    pos", safetensors "I/O error ... os error 28"); any other failure is raised as it is (`remove_partial`
    False: its partial folder left as a kill would leave it, for the next save to remove)."""
    free = shutil.disk_usage(run_dir)
    written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) if tmp.is_dir() else 0
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(w in str(exc) for w in DISK_FULL)
    if remove_partial or full or free.free < 2**20:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (full or free.free < 2**20):
        raise exc
    why = "the disk is full" if full else f"{free.free} bytes left after {type(exc).__name__}: {exc}"
    newest = complete(run_dir)
    kept = f"the newest complete checkpoint, {newest[-1].name}, is intact" if newest else "no earlier checkpoint"
    raise CheckpointWriteFailed(
        f"the checkpoint of step {step} could not be written to {run_dir} ({why}; {_size(free.free)} free of "
        f"{_size(free.total)} on that file system; {_size(written)} were written before the failure and "
        f"removed). Free space or lower train.keep_last, then launch again: {kept}."
    ) from None


def _size(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, hash_files: bool) -> None:
    """Every file of the checkpoint (all ranks' shards: called after the barrier) with its size and hash."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        entry = {"size": path.stat().st_size}
        if hash_files:
            entry["sha256"] = file_sha256(path)
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
        if digest is not None and file_sha256(path) != digest:
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


def own_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints the launcher wrote here (a manifest inside; not a symbolic link), oldest first:
    the only ones retention may delete."""
    return [p for p in complete(run_dir) if not p.is_symlink() and (p / MANIFEST_FILE).is_file()]


def remove_own(path: Path) -> None:
    """Remove a folder the launcher wrote; a symbolic link in its place is unlinked, never followed."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def prune(
    run_dir: Path, keep_last: int, note: Callable[[str], None] | None = None, keep: Collection[Path] = ()
) -> None:
    """Keep the newest `keep_last` of this run's checkpoints, and those in `keep` (the best one); remove stale
    temporary folders of its saves. Anything else (a symbolic link, a folder without a manifest) is left alone,
    and said once."""
    own = own_checkpoints(run_dir)
    kept = {Path(p).name for p in keep}
    for old in own[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(f".tmp-{PREFIX}*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    others = [p.name for p in complete(run_dir) if p not in own]
    if others and note is not None:
        note(f"retention leaves {', '.join(others)} alone: not a checkpoint folder this launcher wrote (a symbolic "
             "link, or no manifest)")  # fmt: skip


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
    remove_own(tmp)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    remove_own(final_dir)  # the export of an earlier launch of this run (output_dir is the run's: launcher.ownership)
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
