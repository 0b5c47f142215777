"""A rank ends with the `launch` process that started it.

torchrun starts each rank as a child of `launch`; if `launch` is killed outright (SIGKILL, the OOM killer), no
handler runs and the ranks would go on alone: training unwatched, holding GPUs, writing "completed" into a
run that nobody follows. On Linux the kernel is asked to send SIGKILL to the rank when its parent dies
(prctl PR_SET_PDEATHSIG); elsewhere a thread checks the parent once a second. The parent may already be gone
by then, so the rank also compares its parent with the pid `launch` gave it (LAUNCHER_AGENT_PID).

No imports beyond the standard library: worker.py calls this before it imports torch (seconds).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

AGENT_PID = "LAUNCHER_AGENT_PID"  # set by backends.torchrun for the ranks it starts
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Arrange for this process to end when its parent does; end now if the parent is already gone."""
    expected = os.environ.get(AGENT_PID)
    if expected is None:  # not started by backends.torchrun (Ray runs ranks in its own workers)
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            _watch_parent(int(expected))
    else:
        _watch_parent(int(expected))
    if os.getppid() != int(expected):  # it died before the request took effect
        os._exit(128 + signal.SIGKILL)


def _watch_parent(expected: int) -> None:
    def watch() -> None:
        while os.getppid() == expected:
            time.sleep(1.0)
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-lifeline", daemon=True).start()
