"""The collective stop request (launcher.train.stop), on the local backend with 2 gloo ranks.

USR1 to ONE rank must stop BOTH at the same step boundary after one checkpoint (a rank that
stopped alone would leave its peer hanging in the next all-reduce); relaunching continues there
and every step is trained exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
from helpers import REPO, launch, metric_lines, small_run, summary

from launcher.errors import ExitCode


def test_usr1_to_one_rank_stops_every_rank_after_a_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    args = [str(a) for a in small_run(tiny["bert"], out, "train.max_steps=60", "train.save_every=1000")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args, "--procs", "2"],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 180
        while not ((out / "metrics.jsonl").exists() and metric_lines(out)):
            assert proc.poll() is None and time.time() < deadline, "training never started"
            time.sleep(0.1)
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        os.kill(ranks[-1].pid, signal.SIGUSR1)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.STOPPED, stderr[-3000:]
    assert "all 2 ranks here stopped on request" in stderr
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "summary.json").exists()
    stopped_at = int(checkpoints[0].split("-")[-1])
    assert 0 < stopped_at < 60  # stopped mid-run, after at least one step
    assert [r["step"] for r in metric_lines(out)] == list(range(1, stopped_at + 1))

    resumed = launch(*small_run(tiny["bert"], out, "train.max_steps=60", "train.save_every=1000"), "--procs", "2")
    assert resumed.returncode == 0, resumed.output[-3000:]
    s = summary(out)
    assert s["steps"] == 60 and s["steps_this_launch"] == 60 - stopped_at
    assert [r["step"] for r in metric_lines(out) if "split" not in r] == list(range(1, 61))
