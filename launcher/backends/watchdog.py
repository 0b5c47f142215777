"""The hang watchdog: a thread beside torchrun that stops a run whose ranks stopped making progress.

A rank that hangs (a deadlock, a stuck file system, a lost peer) leaves the others blocked in their
next collective until the collective timeout, which says nothing about who hung or where. The watchdog
reads the heartbeats of the ranks this launcher started (launcher.train.heartbeat); when one of them has
not moved for longer than `distributed.hang_timeout`, it asks each of them for a stack dump, stops
them (torchrun then returns, so `launch` exits 1) and leaves a report naming the rank that is behind,
where the others wait, and the top frames of the stuck rank's stack. Under Slurm each node's agent runs
its own watchdog; heartbeats of the other nodes' ranks (on a shared run directory) are named too.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from launcher.records import DUMP_SIGNAL, PHASES, read_beats, stack_path

DUMP_WAIT_S = 5.0  # how long the dumps may take to appear before the ranks are stopped anyway
KILL_AFTER_S = 10.0  # SIGTERM first; SIGKILL what is still alive after this
TOP_FRAMES = 6


class Watchdog(threading.Thread):
    def __init__(self, run_dir: Path, limit_s: float):
        super().__init__(name="hang-watchdog", daemon=True)
        self.run_dir, self.limit_s = Path(run_dir), limit_s
        self.report: str | None = None  # set, before any rank is stopped, when the watchdog fired
        self._done = threading.Event()
        self._since = time.time()
        self._poll_s = min(1.0, limit_s / 4)

    def stop(self) -> None:
        self._done.set()

    def run(self) -> None:
        host, me = socket.gethostname(), os.getpid()
        while not self._done.wait(self._poll_s):
            beats = [b.model_dump() for b in read_beats(self.run_dir, self._since) if b.phase != "done"]
            mine = [b for b in beats if b["host"] == host and b["agent_pid"] == me]
            now = time.time()
            if any(now - b["time"] > self.limit_s for b in mine):
                self._fire(beats, mine, now)
                return

    def _fire(self, beats: list[dict], mine: list[dict], now: float) -> None:
        for beat in mine:
            _signal(beat["pid"], DUMP_SIGNAL)
        dumps = {b["rank"]: stack_path(self.run_dir, b["rank"]) for b in mine}
        deadline = time.time() + DUMP_WAIT_S
        while time.time() < deadline and not all(_size(p) for p in dumps.values()):
            time.sleep(0.1)
        time.sleep(0.2)  # a dump seen non-empty may still be being written
        self.report = describe(beats, dumps, now, self.limit_s)
        for beat in mine:
            _signal(beat["pid"], signal.SIGTERM)
        deadline = time.time() + KILL_AFTER_S
        while time.time() < deadline and any(_alive(b["pid"]) for b in mine):
            time.sleep(0.2)
        for beat in mine:
            _signal(beat["pid"], signal.SIGKILL)


def behind(beats: list[dict]) -> list[dict]:
    """The ranks furthest back in the run: those the others wait for."""

    def position(beat):
        return beat["step"], PHASES.index(beat["phase"])

    first = min(position(b) for b in beats)
    return [b for b in beats if position(b) == first]


def describe(beats: list[dict], dumps: dict[int, Path], now: float, limit_s: float) -> str:
    stuck = behind(beats)
    lines = []
    for beat in stuck:
        lines.append(
            f"rank {beat['rank']} hung: no progress for {now - beat['time']:.1f} s (distributed.hang_timeout "
            f"{limit_s:g} s) at step {beat['step']}, phase {beat['phase']} ({where(beat)})"
        )
        frames = top_frames(dumps.get(beat["rank"]))
        if frames:
            lines.append(f"  innermost frames of rank {beat['rank']} (from {dumps[beat['rank']]}):")
            lines.extend(f"    {frame}" for frame in frames)
    if len(stuck) == len(beats) and len(beats) > 1:
        lines.append(
            "every rank is at the same step and phase: a collective that never completed (a network or "
            "peer problem), or every rank hung there; see the stacks"
        )
    for beat in beats:
        if beat not in stuck:
            lines.append(
                f"rank {beat['rank']} waits in {beat['phase']} at step {beat['step']} ({where(beat)}), "
                f"{now - beat['time']:.1f} s without progress"
            )
            frames = top_frames(dumps.get(beat["rank"]))
            if frames:
                lines.append(f"  innermost frame (the collective it waits in, if any): {frames[0]}")
    dumped = [str(path) for _, path in sorted(dumps.items()) if _size(path)]
    lines.append(f"stack dumps of every thread: {', '.join(dumped) or 'none written'}")
    lines.append(
        "every rank here was stopped. If a phase legitimately takes that long (a slow checkpoint write, a "
        "long evaluation), raise distributed.hang_timeout; 0 turns the watchdog off"
    )
    return "\n".join(lines)


def where(beat: dict) -> str:
    return f"host {beat['host']}, pid {beat['pid']}"


def top_frames(dump: Path | None) -> list[str]:
    """The innermost frames of the thread running the training loop, from a faulthandler dump."""
    if dump is None or not _size(dump):
        return []
    threads, current = [], None
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            current = []
            threads.append(current)
        elif line.strip().startswith("File ") and current is not None:
            current.append(line.strip())
    training = [t for t in threads if any("launcher/train/run.py" in frame for frame in t)]
    chosen = (training or threads or [[]])[-1]
    return chosen[:TOP_FRAMES]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # a zombie is dead, waiting for torchrun
    except psutil.NoSuchProcess:
        return False
