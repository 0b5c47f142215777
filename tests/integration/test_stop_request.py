"""The collective stop request (launcher.train.stop) and the life of a run around it, on the local backend with
2 gloo ranks, in one chain of three launches of the same output_dir:

1. USR1 to ONE rank must stop BOTH at the same step boundary after one checkpoint (a rank that stopped alone
   would leave its peer hanging in the next all-reduce). While it runs, a second launch into its output_dir
   is refused in under a second, naming the holder (launcher.ownership).
2. Relaunched with a new learning rate: the plan's start row lists the change and the schedule continues with
   it (the checkpoint holds no schedule). USR1 to `launch` itself, not to a rank, stops the same way (launch
   forwards it), exit 75.
3. Relaunched as written: it continues there, and every step is trained exactly once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from helpers import REPO, launch, metric_lines, small_run, summary

from launcher import cli
from launcher.errors import ExitCode

STEPS = 60
NEW_LR = 5e-4  # small_run trains at 1e-3


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "400"}  # the plan table's rows unwrapped
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


def wait_for_step(proc: subprocess.Popen, out, after: int) -> None:
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or max((r["step"] for r in metric_lines(out)), default=0) <= after:
        assert proc.poll() is None and time.time() < deadline, "training never (re)started"
        time.sleep(0.1)


def second_launch(args: list) -> tuple[int, str, float]:
    err, stdout = io.StringIO(), io.StringIO()
    began = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
        code = cli.main(args)
    return code, err.getvalue() + stdout.getvalue(), time.perf_counter() - began


def stopped_at(out) -> int:
    [folder] = sorted(out.glob("checkpoint-*"))[-1:]
    return int(folder.name.split("-")[-1])


def test_a_stop_request_stops_every_rank_after_a_checkpoint_and_the_run_continues(tiny, tmp_path):
    out = tmp_path / "run"
    args = [str(a) for a in small_run(tiny["bert"], out, f"train.max_steps={STEPS}", "train.save_every=1000")]
    args += ["--procs", "2"]
    proc = start(args)
    try:
        wait_for_step(proc, out, 0)
        code, text, seconds = second_launch(args)
        print(f"a second launch into the same output_dir was refused in {seconds * 1000:.0f} ms")
        assert code == 2 and f"is in use by `launch` pid {proc.pid} on host" in text, text
        assert seconds < 1.0
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
    first_stop = stopped_at(out)
    assert 0 < first_stop < STEPS  # stopped mid-run, after at least one step
    assert [r["step"] for r in metric_lines(out)] == list(range(1, first_stop + 1))

    proc = start([*args, f"train.optimizer.lr={NEW_LR}"])
    try:
        wait_for_step(proc, out, first_stop)
        os.kill(proc.pid, signal.SIGUSR1)  # to launch: it forwards the request to its ranks
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == ExitCode.STOPPED, stderr[-3000:]
    assert "changed since the checkpoint, taking effect: train.optimizer.lr 0.001 → 0.0005" in stdout, stdout
    second_stop = stopped_at(out)
    assert first_stop < second_stop < STEPS
    plan = json.loads((out / "launch" / "plan.json").read_text())
    warmup, total = plan["warmup_steps"], plan["total_steps"]
    for record in metric_lines(out):  # the linear schedule of the lr in force at each step, after its warm-up
        lr = 1e-3 if record["step"] <= first_stop else NEW_LR
        if "split" not in record and record["step"] > warmup:
            assert abs(record["lr"] - lr * (total - record["step"]) / (total - warmup)) < 1e-12, record

    resumed = launch(*args, f"train.optimizer.lr={NEW_LR}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    s = summary(out)
    assert s["steps"] == STEPS and s["steps_this_launch"] == STEPS - second_stop
    assert [r["step"] for r in metric_lines(out) if "split" not in r] == list(range(1, STEPS + 1))
