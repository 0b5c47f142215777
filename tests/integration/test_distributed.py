"""Real multi-process runs through the `launch` command (gloo ranks on CPU).

The 1-vs-2-process comparison is the check that ranks really synchronise
gradients and shard data: two ranks that each trained alone on half the data
would end with different weights on each rank and far from the 1-process run.
"""

from __future__ import annotations

import time

import pytest
from helpers import assert_same_weights, final_weights, launch, metric_lines, small_run, summary


@pytest.fixture(scope="module")
def one_and_two(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    # data.balance: the weighted sampler must be world-size invariant too
    one = launch(*small_run(tiny["bert"], root / "one", "data.balance=true"), "--procs", "1")
    two = launch(*small_run(tiny["bert"], root / "two", "data.balance=true"), "--procs", "2")
    return root, one, two


def test_two_ranks_train_as_one_world(one_and_two):
    root, one, two = one_and_two
    assert one.returncode == 0, one.output
    assert two.returncode == 0, two.output
    s = summary(root / "two")
    assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU" and s["backend"] == "gloo"
    assert s["plan"]["grad_accum"] == 2 and s["plan"]["micro_batch_size"] == 2
    checksums = s["param_checksum_per_rank"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert s["steps"] == 12 and s["samples_seen"] == 96


def test_two_ranks_give_the_one_rank_result(one_and_two):
    """Same global batch → same optimisation, whatever the world size (fp32, no dropout)."""
    root, one, two = one_and_two
    a, b = final_weights(root / "one"), final_weights(root / "two")
    assert_same_weights(a, b, atol=2e-5)
    losses_one = [r["loss"] for r in metric_lines(root / "one") if "loss" in r and "split" not in r]
    losses_two = [r["loss"] for r in metric_lines(root / "two") if "loss" in r and "split" not in r]
    assert len(losses_one) == 12 and losses_one == pytest.approx(losses_two, abs=1e-4)


@pytest.mark.slow  # CI has tests/test_kill.py's kill inside a checkpoint write, and Ray's killed worker with dropout
def test_killed_rank_fails_fast_and_resume_equals_uninterrupted(tiny, tmp_path):
    """Rank 1 is SIGKILLed at step 6: the launch exits non-zero promptly naming it; launching
    again resumes from checkpoint 4 (model, optimizer, scheduler, RNG: dropout is on) and ends
    with exactly the weights of a run that was never interrupted."""
    model = tiny["bert_dropout"]
    clean = launch(*small_run(model, tmp_path / "clean"), "--procs", "2")
    assert clean.returncode == 0, clean.output

    run = tmp_path / "killed"
    start = time.time()
    killed = launch(*small_run(model, run), "--procs", "2", env={"LAUNCHER_FAULT": "rank=1,step=6,phase=step"})
    assert killed.returncode == 1, killed.output
    assert time.time() - start < 60, "start-up, 6 steps and the failure report take well under a minute"
    assert "rank 1" in killed.stderr and "SIGKILL" in killed.stderr, killed.stderr[-2000:]
    assert not (run / "final").exists() and not (run / "summary.json").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-00000004"]

    resumed = launch(*small_run(model, run), "--procs", "2")
    assert resumed.returncode == 0, resumed.output
    s = summary(run)
    assert s["resumed_from"].endswith("checkpoint-00000004") and s["steps_this_launch"] == 8
    steps = [r["step"] for r in metric_lines(run) if "split" not in r]
    assert steps == list(range(1, 13)), "every step is recorded exactly once"
    assert_same_weights(final_weights(tmp_path / "clean"), final_weights(run), atol=1e-6)
    assert s["train_loss"] == pytest.approx(summary(tmp_path / "clean")["train_loss"], abs=1e-6)


def test_exception_in_one_rank_is_reported_with_rank_and_message(tiny, tmp_path):
    run = launch(
        *small_run(tiny["bert"], tmp_path / "run"),
        "--procs",
        "2",
        env={"LAUNCHER_FAULT": "rank=1,step=3,phase=step,kind=raise"},
    )
    assert run.returncode == 1, run.output
    assert "rank 1" in run.stderr and "injected failure at step 3" in run.stderr, run.stderr[-2000:]
    verdict = run.stderr.split("error: training failed")[-1]
    assert "rank 1" in verdict and "exited with code 1: RuntimeError: injected failure at step 3" in verdict
    assert "Traceback" not in verdict


def test_sigterm_to_launch_stops_every_rank(tiny, tmp_path):
    """scancel or Ctrl-C: launch stops all ranks at once and exits 128+signal, leaving no orphans."""
    import os
    import signal
    import subprocess
    import sys

    import psutil
    from helpers import REPO

    out = tmp_path / "run"
    args = [str(a) for a in small_run(tiny["bert"], out, "train.max_steps=100000")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *args, "--procs", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "training never started"
        time.sleep(0.2)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    start = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert time.time() - start < 30
    assert "stopped by SIGTERM; every rank was terminated" in stderr
    assert not [p for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
