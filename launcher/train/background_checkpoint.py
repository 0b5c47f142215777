"""A checkpoint whose sharded states are written in the background (train.checkpoint_async under fsdp).

torch DCP's async_save returns once the states are copied to host memory; the loop goes on while a thread
writes them. The guarantees of train.checkpoint.save hold: the folder is renamed into place only when complete,
with its manifest, so a kill during the background write leaves a .tmp folder and the previous checkpoint as
they were; a failed write (a full disk) removes the partial folder and is said as checkpoint.save says it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import Future
from pathlib import Path

from launcher.records import CheckpointState
from launcher.train.checkpoint import begin, put_in_place, raise_write_failed


class Background:
    """A checkpoint being written (engine.save_async). Rank 0 renames it in its writing thread: its DCP write
    ends by gathering every rank's write results (DCP's metadata), so every rank's files are then written,
    Accelerate's states too (saved before the write began)."""

    def __init__(self, accelerator, final: Path, state: CheckpointState, written: Future):
        self.acc, self.folder, self.state, self.written = accelerator, final, state, written

    def done(self) -> bool:
        """Whether the checkpoint is in place, agreed by every rank (a collective: every rank calls it)."""
        import torch

        mine = torch.tensor([int(self.written.done())], device=self.acc.device)
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MIN)
        return bool(mine.item())

    def wait(self) -> Path:
        """Block until the checkpoint is in place on every rank; a failed background write raises here."""
        self.written.result()
        self.acc.wait_for_everyone()
        return self.folder


def save_in_background(
    accelerator,
    run_dir: Path,
    step: int,
    state: CheckpointState,
    keep_last: int,
    engine,
    hash_files: bool = True,
    written: Callable[[], None] | None = None,
    note: Callable[[str], None] | None = None,
    keep: Collection[Path] = (),
) -> Background:
    """Like checkpoint.save, returning as soon as the engine has staged its states; `written()` runs in the
    writing thread once this rank's sharded files are written, before the rename (the failure drill's
    phase=write)."""
    tmp, final = begin(accelerator, run_dir, step)
    try:
        writes = engine.save_async(tmp, written)
    except Exception as exc:  # staging can fail too (a full disk under the metadata)
        raise_write_failed(exc, tmp, run_dir, step)
    in_place: Future = Future()

    def settle(finished: Future) -> None:  # in the writing thread, or here when it finished already
        try:
            try:
                finished.result()
            except Exception as exc:  # a full disk named and its partial folder removed; a peer's death (a
                # collective of the write failing) leaves the folder as the kill of a synchronous save would
                raise_write_failed(exc, tmp, run_dir, step, remove_partial=False)
            if accelerator.is_main_process:
                put_in_place(tmp, final, state, step, keep_last, hash_files, note, keep)
            in_place.set_result(final)
        except BaseException as exc:  # the loop sees it at done()/wait()
            in_place.set_exception(exc)

    writes.add_done_callback(settle)
    return Background(accelerator, final, state, in_place)
