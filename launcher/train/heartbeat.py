"""Heartbeats: every rank notes where it is (step, phase, time), for the launcher's hang watchdog.

A hung rank and the ranks waiting for it in a collective all stop making progress; their last notes
tell them apart (the hung one is behind). One small JSON file per rank, RUN/.heartbeat/rank-R.json,
replaced atomically (write, rename) when the phase changes: no collective, no fsync, a few tens of
microseconds per phase change. Each rank also registers faulthandler on DUMP_SIGNAL, so the watchdog can
ask it for a stack dump of all its threads (RUN/.heartbeat/stack-rank-R.txt), even while it is blocked
inside a C call such as a collective.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import time
from pathlib import Path

HEARTBEAT_DIR = ".heartbeat"
DUMP_SIGNAL = signal.SIGUSR2  # USR1 is the stop request (launcher.train.stop)
# The phases of a run in the order a rank goes through them; a rank earlier in this order at the same step is behind.
PHASES = ("data", "forward", "backward", "optimizer", "eval", "save", "stop-sync", "final-save", "final-eval",
          "export", "done")


def beat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"rank-{rank}.json"


def stack_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEAT_DIR / f"stack-rank-{rank}.txt"


class Heartbeat:
    """`beat(step, phase)` at each phase change; a no-op when the watchdog is off (hang_timeout 0 or null)."""

    def __init__(self, run_dir: Path, rank: int, local_rank: int, enabled: bool):
        self.enabled = enabled
        self._last: tuple[int, str] | None = None
        if not enabled:
            return
        self._path = beat_path(run_dir, rank)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path.with_name(f".{self._path.name}.tmp")
        # kept open for the life of the rank: faulthandler writes to its descriptor from the signal handler
        self._stacks = open(stack_path(run_dir, rank), "w")
        faulthandler.register(DUMP_SIGNAL, file=self._stacks, all_threads=True)
        # agent_pid: the launcher process (torchrun's agent) that started this rank and watches it
        self._who = {"rank": rank, "local_rank": local_rank, "host": socket.gethostname(), "pid": os.getpid(),
                     "agent_pid": os.getppid()}

    def __call__(self, step: int, phase: str) -> None:
        if not self.enabled or self._last == (step, phase):
            return
        self._last = (step, phase)
        self._tmp.write_text(json.dumps({**self._who, "step": step, "phase": phase, "time": time.time()}))
        os.replace(self._tmp, self._path)


def read_beats(run_dir: Path, since: float) -> list[dict]:
    """Every rank's last note written after `since` (older files are from an earlier launch)."""
    beats = []
    for path in (Path(run_dir) / HEARTBEAT_DIR).glob("rank-*.json"):
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced between glob and read: the next poll sees the new one
        if beat["time"] >= since:
            beats.append(beat)
    return sorted(beats, key=lambda b: b["rank"])
