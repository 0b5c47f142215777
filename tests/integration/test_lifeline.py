"""train.lifeline without a training run: a process started with LAUNCHER_AGENT_PID ends when that parent dies
(SIGKILL, no handler), and at once when its parent is already another process. The same code runs first in every
rank (train/worker.py); tests/integration/test_kill.py kills a real `launch` with its ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from helpers import REPO, ended

CHILD = "from launcher.train.lifeline import die_with_parent; die_with_parent(); import time; time.sleep(600)"
PARENT = (
    "import os, subprocess, sys, time; env = {**os.environ, 'LAUNCHER_AGENT_PID': str(os.getpid())}; "
    f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], env=env); "
    "print(child.pid, flush=True); time.sleep(600)"
)


def test_a_child_ends_with_the_parent_that_started_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # the child has asked for its parent's death signal
        assert child.is_running() and child.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        began = time.time()
        assert ended([child], timeout=10) == []
        print(f"the child ended {time.time() - began:.2f} s after its parent's SIGKILL")
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_is_already_gone_ends_at_once():
    env = {**os.environ, "LAUNCHER_AGENT_PID": "1"}  # the parent is this test, not pid 1: it "died" before
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, timeout=60)
    assert done.returncode == 128 + signal.SIGKILL
