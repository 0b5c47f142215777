"""Failure drills: make one rank die (or hang) at a chosen point, to rehearse what that does to a run.

LAUNCHER_FAULT="rank=R,step=S,phase=step|eval|save|write[,kind=kill|raise|hang|slow][,once=PATH]" makes rank R
die at step S: SIGKILL (default), an exception (kind=raise) or a hang for ever (kind=hang, for the watchdog);
kind=slow[,seconds=X] makes it a straggler instead: X seconds (default 0.5) more at that point of every step
from S on (train.throughput names it).
Phases: step (entering the step), eval, save (entering a checkpoint), write (inside checkpoint.save, this
rank's files written, the folder not yet renamed). With once=PATH only the first time (PATH marks it done),
so a backend that restarts the ranks by itself (Ray) gets past it. The tests use it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "LAUNCHER_FAULT"


def _hang() -> None:
    """The hang drill: a plain Python loop, so that the rank's stack dump shows this frame."""
    while True:
        time.sleep(0.05)


class Drill:
    """`drill(step, phase)` at each drill point; does nothing unless LAUNCHER_FAULT names this rank."""

    def __init__(self, rank: int, spec: str | None = None):
        self.rank = rank
        spec = os.environ.get(FAULT_ENV) if spec is None else spec
        self.want = dict(part.split("=", 1) for part in spec.split(",")) if spec else None

    def __call__(self, step: int, phase: str) -> None:
        want = self.want
        if want is None or int(want.get("rank", -1)) != self.rank or want.get("phase", "step") != phase:
            return
        if want.get("kind") == "slow":
            if step >= int(want.get("step", 0)):
                time.sleep(float(want.get("seconds", 0.5)))
            return
        if int(want.get("step", -1)) != step:
            return
        if "once" in want:
            if os.path.exists(want["once"]):
                return
            Path(want["once"]).touch()
        if want.get("kind", "kill") == "raise":
            raise RuntimeError(f"injected failure at step {step} ({FAULT_ENV})")
        if want.get("kind") == "hang":
            _hang()
        os.kill(os.getpid(), signal.SIGKILL)


def delay(phase: str) -> None:
    """LAUNCHER_FAULT="phase=prepare,kind=slow,seconds=S": work outside any rank (the tokenized cache's
    preparation, before the ranks start) takes S seconds longer, to show that no collective waits on it."""
    spec = os.environ.get(FAULT_ENV)
    want = dict(part.split("=", 1) for part in spec.split(",")) if spec else {}
    if want.get("phase") == phase and want.get("kind") == "slow":
        time.sleep(float(want.get("seconds", "10")))
