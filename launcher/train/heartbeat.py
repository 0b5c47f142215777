"""Heartbeats: every rank notes where it is (step, phase, time), for the launcher's hang watchdog.

A hung rank and the ranks waiting for it in a collective all stop making progress; their last notes
tell them apart (the hung one is behind). A phase change only stores (step, phase, time) in memory,
well under a microsecond; a small thread of the rank writes the newest note, when it changed, to
RUN/.heartbeat/rank-R.json every FLUSH_S (write, then rename: a reader never sees half a note). No
collective, no fsync, nothing on the training thread's path: writing a file per phase change cost
0.6-1 ms here (rename on ext4 under load), ten per step. The thread keeps writing while the training
thread is stuck, in a Python loop or in a collective (both release the GIL).

Each rank also registers faulthandler on DUMP_SIGNAL, so the watchdog can ask it for a stack dump of
all its threads (RUN/.heartbeat/stack-rank-R.txt), even while it is blocked inside a C call.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import threading
import time
from pathlib import Path

from launcher.records import DUMP_SIGNAL, Beat, beat_path, stack_path

FLUSH_S = 0.25  # how stale a note on disk may be; far below any hang_timeout worth setting


class Heartbeat:
    """`beat(step, phase)` at each phase change; a no-op when the watchdog is off (hang_timeout 0 or null)."""

    def __init__(self, run_dir: Path, rank: int, local_rank: int, enabled: bool):
        self.enabled = enabled
        self._note: tuple[int, str, float] | None = None
        if not enabled:
            return
        self._path = beat_path(run_dir, rank)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(f".{self._path.name}.tmp")
        # kept open for the life of the rank: faulthandler writes to its descriptor from the signal handler
        self._stacks = open(stack_path(run_dir, rank), "w")
        faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True)
        # agent_pid: the launcher process (torchrun's agent) that started this rank and watches it
        self._who = {
            "rank": rank,
            "local_rank": local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "agent_pid": os.getppid(),
        }
        self._written: tuple[int, str, float] | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_forever, name="heartbeat", daemon=True).start()

    def __call__(self, step: int, phase: str) -> None:
        if self.enabled and (self._note is None or self._note[:2] != (step, phase)):
            self._note = (step, phase, time.time())
            if phase == "done":
                self._write()  # the rank is about to exit, and its daemon thread with it

    def advance(self) -> None:
        """Progress inside a phase that may legitimately run long (evaluation: once per batch)."""
        if self.enabled and self._note is not None:
            self._note = (*self._note[:2], time.time())

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            if self._note is not self._written:
                self._write()

    def _write(self) -> None:
        with self._lock:  # the training thread writes "done" itself
            note = self._note
            step, phase, since = note
            self._tmp.write_text(Beat(**self._who, step=step, phase=phase, time=since).model_dump_json())
            os.replace(self._tmp, self._path)
            self._written = note
