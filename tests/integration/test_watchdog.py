"""The hang watchdog and the collective timeout, with 2 real gloo ranks and the hang drill.

A rank that hangs (LAUNCHER_FAULT kind=hang: a Python loop inside the step) must not keep the job until
the collective timeout: the watchdog dumps every rank's stack, stops them, and `launch` names the rank
that hung (the one behind) and where the other waits. With the watchdog off, the collective timeout of
the process group must fire instead, with a message that says what it means.
"""

from __future__ import annotations

import json
import time

import psutil
from helpers import launch, small_run

from launcher.records import beat_path, stack_path

HANG_AT_STEP = 5
HANG_TIMEOUT_S = 5


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_hung_rank_is_named_with_its_stack_and_every_rank_is_stopped(tiny, tmp_path):
    out = tmp_path / "run"
    done = launch(
        *small_run(
            tiny["bert"], out, f"distributed.hang_timeout={HANG_TIMEOUT_S}", "distributed.collective_timeout=120"
        ),
        "--procs",
        "2",
        env={"LAUNCHER_FAULT": f"rank=1,step={HANG_AT_STEP},kind=hang"},
    )
    exited = time.time()
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    beats = {rank: json.loads(beat_path(out, rank).read_text()) for rank in (0, 1)}
    # the hang starts right after rank 1's note "step 5, data"; launch has exited within the limit + a few seconds
    detection_s = exited - beats[1]["time"]
    print(f"watchdog detection time (hang → launch exit): {detection_s:.1f} s, hang_timeout {HANG_TIMEOUT_S} s")
    assert HANG_TIMEOUT_S < detection_s < HANG_TIMEOUT_S + 20
    assert (beats[1]["step"], beats[1]["phase"]) == (HANG_AT_STEP, "data")
    assert "rank 1 hung: no progress for" in err and f"at step {HANG_AT_STEP}, phase data (host " in err
    assert f"pid {beats[1]['pid']})" in err
    # rank 0 went on into step 5's forward pass, where DDP's buffer broadcast waits for rank 1
    assert f"rank 0 waits in forward at step {HANG_AT_STEP} (host {beats[0]['host']}, pid {beats[0]['pid']})" in err
    assert "rank 0 hung" not in err
    assert "innermost frame (the collective it waits in, if any): File " in err
    dumps = {rank: stack_path(out, rank).read_text() for rank in (0, 1)}
    assert "in _hang" in dumps[1] and "launcher/train/run.py" in dumps[1]
    assert "_broadcast_coalesced" in dumps[0] or "distributed.py" in dumps[0]
    assert str(stack_path(out, 0)) in err and str(stack_path(out, 1)) in err
    inline = err.split("innermost frames of rank 1")[1].splitlines()[1]
    assert inline.strip().startswith("File ") and "in _hang" in inline
    assert all(_gone(beat["pid"]) for beat in beats.values())
    assert not (out / "summary.json").exists()


def test_collective_timeout_fires_when_the_watchdog_is_off(tiny, tmp_path):
    out = tmp_path / "run"
    started = time.time()
    done = launch(
        *small_run(tiny["bert"], out, "distributed.hang_timeout=0", "distributed.collective_timeout=4"),
        "--procs",
        "2",
        env={"LAUNCHER_FAULT": f"rank=1,step={HANG_AT_STEP},kind=hang"},
    )
    err = done.stderr
    assert done.returncode == 1, err[-3000:]
    assert "rank 0 (local rank 0 on" in err and "Timed out waiting 4000ms" in err
    assert "waited longer than distributed.collective_timeout" in err
    assert not (out / ".heartbeat").exists()  # the watchdog is off: no heartbeats either
    print(f"collective timeout 4 s: launch exited after {time.time() - started:.1f} s in all")


GROUP_TIMEOUTS = """
import os, sys, torch, torch.distributed as dist
from launcher.config.loading import load_recipe
from launcher.train.components import collective_timeout
recipe = load_recipe(sys.argv[1], ["output_dir=" + sys.argv[2], "distributed.hang_timeout=0",
                                   "distributed.collective_timeout=7"])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", timeout=collective_timeout(recipe))  # what make_accelerator hands Accelerate
later = dist.new_group([0])  # as DeepSpeed makes its groups: no timeout given
print([g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in (dist.group.WORLD, later)])
dist.destroy_process_group()
"""


def test_groups_made_later_get_the_collective_timeout_too(tmp_path):
    """torch gives a group made without a timeout its module default (30 min), not the world group's."""
    import socket
    import subprocess
    import sys

    from helpers import RECIPES, REPO

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", GROUP_TIMEOUTS, str(RECIPES / "quickstart.yaml"), str(tmp_path), str(port)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[7.0, 7.0]"
