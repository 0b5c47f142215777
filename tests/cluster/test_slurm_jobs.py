"""Real Slurm jobs through the `launch` command: 2 nodes (n1, n2) of the session's testbed, gloo ranks.

The testbed (tests/slurm/start-slurm.sh: munge, slurmctld, one slurmd per node in its own UTS
namespace) starts once per session; it installs Debian's slurm-wlm when missing and needs root.
Without root or apt-get these tests are skipped with that reason.

Covers: a 2-node run to completion, 2 ranks per node, preemption (checkpoint → requeue → resume,
every step exactly once), a killed rank failing the job fast with node and rank named, secrets
passed through the environment and absent from every written file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import RECIPES, REPO, final_weights, launch, metric_lines, summary

from launcher.train import checkpoint

SECRET = "s3cr3t-" + secrets.token_hex(8)
HF_SECRET = "hf_" + secrets.token_hex(8)
ENV = {"LAUNCHER_TEST_SECRET": SECRET, "HF_TOKEN": HF_SECRET}


def cpu_profile(folder: Path, **fields) -> Path:
    """The shipped cluster/slurm-cpu.yaml (the testbed's partition `debug`), with a secret to pass."""
    data = {
        **yaml.safe_load((REPO / "cluster" / "slurm-cpu.yaml").read_text()),
        "secret_env": ["LAUNCHER_TEST_SECRET"],
        # proves the secret reached the job without printing it
        "setup": ['[ -n "${LAUNCHER_TEST_SECRET:-}" ] || { echo "LAUNCHER_TEST_SECRET missing" >&2; exit 3; }'],
        **fields,
    }
    path = folder / "slurm-cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_run(model: str, out: Path, *extra: str) -> list:
    return [
        RECIPES / "quickstart.yaml",
        f"model.path={model}",
        f"output_dir={out}",
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=8",
        "train.optimizer.lr=1e-3",
        "train.log_every=1",
        "train.eval_every=null",
        "data.test=null",
        *extra,
    ]


def assert_no_secret_written(*roots: Path) -> None:
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert SECRET.encode() not in data and HF_SECRET.encode() not in data, f"secret in {path}"


def test_two_nodes_train_one_world_and_one_node_resumes_it(slurm_cluster, tiny, tmp_path):
    """Then (issue 6: resume at any world size) the 2-node job's step-4 checkpoint, finished by a 1-node job,
    ends with the 2-node job's weights (no dropout: equal up to float summation order)."""
    out = tmp_path / "run"
    run = launch(
        *tiny_run(tiny["bert"], out, "train.save_every=4"),
        "--nodes",
        "2",
        "--cluster",
        cpu_profile(tmp_path),
        "--follow",
        env=ENV,
        timeout=300,
    )
    assert run.returncode == 0, run.output[-4000:]
    assert re.search(r"submitted job \d+", run.stdout) and "COMPLETED" in run.stdout
    s = summary(out)
    assert s["world_size"] == 2 and s["hosts"] == ["n1", "n2"] and s["backend"] == "gloo"
    assert s["steps"] == 8 and s["train_loss"]["last"] < s["train_loss"]["first"]
    checksums = s["param_checksum_per_rank"]
    assert checksums[0] == checksums[1], "the two nodes hold the same weights"
    assert (out / "job.sbatch").exists() and (out / "slurm.log").exists()
    # each node's agent saw to the tokenized cache before its ranks started (one writer, or already there)
    prepared = re.findall(r"\[launch\] node (n\d) \(\d of 2, job \d+\): data", (out / "slurm.log").read_text())
    assert sorted(set(prepared)) == ["n1", "n2"], (out / "slurm.log").read_text()[-3000:]
    assert "\x1b[" not in (out / "slurm.log").read_text(), "no raw ANSI colour codes in the job's log"
    assert SECRET not in run.output and HF_SECRET not in run.output
    assert_no_secret_written(out, tmp_path / "slurm-cpu.yaml")
    status = launch("status", out)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "step 8 of 8" in status.stdout, status.output

    one = tmp_path / "one"
    shutil.copytree(
        out, one, ignore=shutil.ignore_patterns("checkpoint-00000008", "final", "summary.json", "slurm.log")
    )
    resumed = launch(
        *tiny_run(tiny["bert"], one, "train.save_every=4"),
        "--nodes",
        "1",
        "--cluster",
        cpu_profile(tmp_path),
        "--follow",
        env=ENV,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.output[-4000:]
    r = summary(one)
    assert r["resumed_world_size"] == 2 and r["world_size"] == 1 and r["steps_this_launch"] == 4
    a, b = final_weights(out), final_weights(one)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


@pytest.mark.slow
def test_launch_prepare_as_a_job_step_on_every_node(slurm_cluster, tiny, tmp_path):
    """`launch prepare --cluster`: the job's one step runs each node's agent, which tokenizes into the cache
    folder both nodes share (one writes each entry, the other waits on its lock file) and starts no rank."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    run = launch(
        "prepare",
        *tiny_run(tiny["bert"], out),
        "--nodes",
        "2",
        "--cluster",
        cpu_profile(tmp_path),
        "--follow",
        env={**ENV, "LAUNCHER_CACHE_DIR": str(cache)},
        timeout=300,
    )
    assert run.returncode == 0, run.output[-4000:]
    log = (out / "slurm.log").read_text()
    assert "node n1" in log and "node n2" in log and log.count(": data prepared") == 2, log[-3000:]
    written = re.findall(r"tokenized [\d,]+ rows", log)
    assert len(written) == 2, log[-3000:]  # train and validation, each written by one node only
    assert len(list((cache / "tokenized").glob("*/manifest.json"))) == 2
    assert not (out / "summary.json").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.slow  # the eval path is the training path with train.max_steps=0 (tests/integration/test_best_and_eval.py)
def test_eval_as_a_two_node_slurm_job(slurm_cluster, tiny, tmp_path):
    """`launch eval` of the base model as a 2-node Slurm job: a summary with the validation metrics, no
    training, no checkpoint, no export; the same numbers as on this machine's one process."""
    out = tmp_path / "run"
    args = [*tiny_run(tiny["bert"], out), "data.test=null"]
    run = launch("eval", *args, "--nodes", "2", "--cluster", cpu_profile(tmp_path), "--follow", env=ENV, timeout=300)
    assert run.returncode == 0, run.output[-4000:]
    s = summary(out / "eval" / "base")
    assert s["steps"] == 0 and s["world_size"] == 2 and s["final_model"] is None and s["hosts"] == ["n1", "n2"]
    here = launch("eval", *args, f"output_dir={tmp_path / 'here'}", "--procs", "1", env=ENV, timeout=300)
    assert here.returncode == 0, here.output[-4000:]
    assert summary(tmp_path / "here" / "eval" / "base")["metrics"]["validation"]["loss"] == pytest.approx(
        s["metrics"]["validation"]["loss"], rel=1e-5
    )


def test_without_a_profile_a_multinode_launch_finds_this_slurm(slurm_cluster, tmp_path):
    """No --cluster, no LAUNCHER_CLUSTER, no default file, and sbatch on PATH: the site's Slurm, with its own
    default partition, and GPUs per node as sinfo reports them (the testbed has none)."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "no-config"), "LAUNCHER_CLUSTER": "", "RAY_ADDRESS": ""}
    run = launch(RECIPES / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", "--nodes", "2", "--dry-run", env=env)
    assert run.returncode == 0, run.output[-3000:]
    plan = re.sub(r"[│\s]+", " ", run.stdout)  # the plan's cells wrap at 100 columns
    assert "slurm (detected: sbatch on PATH" in plan and "CPU ranks: sinfo shows no GPUs" in plan, run.stdout
    assert "#SBATCH --nodes=2" in run.stdout and "--partition" not in run.stdout


def test_cancel_a_submitted_job(slurm_cluster, tiny, tmp_path):
    out = tmp_path / "run"
    run = launch(*tiny_run(tiny["bert"], out), "--nodes", "2", "--cluster", cpu_profile(tmp_path), env=ENV)
    assert run.returncode == 0, run.output[-3000:]
    job_id = re.search(r"submitted job (\d+)", run.stdout).group(1)
    cancel = launch("cancel", out)
    assert cancel.returncode == 0 and f"scancel {job_id}: done" in cancel.stdout, cancel.output
    deadline = time.time() + 60
    while "CANCELLED" not in (status := launch("status", job_id)).stdout:
        assert time.time() < deadline, status.output
        time.sleep(1)


def _in_allocation(nodelist: str, **more: str) -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": nodelist, **more}


def test_agent_fails_at_once_when_the_first_node_does_not_resolve(slurm_cluster, tmp_path):
    env = _in_allocation("nosuchnode[1-2]", SLURM_STEP_ID="0", SLURM_NODEID="1")
    run = launch(RECIPES / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", env=env, timeout=120)
    assert run.returncode == 1, run.output[-3000:]
    assert "the first node 'nosuchnode1' of 'nosuchnode[1-2]' does not resolve" in run.stderr


def test_launch_outside_a_step_of_a_multinode_allocation_says_how_to_srun_it(slurm_cluster, tmp_path):
    run = launch(RECIPES / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", env=_in_allocation("n[1-2]"))
    assert run.returncode == 2, run.output[-3000:]
    assert "start one agent per node with\n  srun --ntasks-per-node=1 --kill-on-bad-exit=1 launch" in run.stderr


def test_plain_sbatch_example_runs_launch_as_the_per_node_agent(slurm_cluster, tiny, tmp_path):
    """slurm/launch.sbatch: the user's own job script calls `launch`, which trains instead of submitting
    (2 nodes x 2 ranks: world size 4)."""
    out = tmp_path / "run"
    args = [str(a) for a in tiny_run(tiny["bert"], out)]
    env = {**os.environ, "LAUNCH": f"{sys.executable} -m launcher.cli", "OMP_NUM_THREADS": "1"}
    job_id = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--output={tmp_path / 'job.log'}",
            "--wait",
            str(REPO / "slurm" / "launch.sbatch"),
            *args,
            "--procs",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job_id.returncode == 0, (tmp_path / "job.log").read_text()[-3000:]
    s = summary(out)
    assert s["world_size"] == 4 and s["hosts"] == ["n1", "n2"] and s["steps"] == 8


def _start(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", *map(str, args)],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
    )


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        steps = [r["step"] for r in metric_lines(out)] if (out / "metrics.jsonl").exists() else []
        if steps and max(steps) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline, f"training did not reach step {step}"
        time.sleep(0.2)


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tiny, tmp_path):
    """2 nodes x 2 ranks (world size 4). The time-limit warning (USR1 to the batch shell, as
    --signal=B:USR1@grace sends it) mid-training: every rank stops at one step after a checkpoint,
    the job requeues itself and finishes the plan."""
    out = tmp_path / "run"
    proc = _start(
        [
            *tiny_run(
                tiny["bert"], out, "train.max_steps=40", "train.save_every=1000", "train.report_to=[tensorboard]"
            ),
            "--nodes",
            "2",
            "--cluster",
            cpu_profile(tmp_path, procs_per_node=2),
            "--follow",
        ],
        ENV,
    )
    try:
        _wait_for_step(proc, out, 3)
        job_id = (out / "launch" / "jobs").read_text().split()[-1]
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    s = summary(out)
    assert s["world_size"] == 4 and s["hosts"] == ["n1", "n2"] and len(set(s["param_checksum_per_rank"])) == 1
    assert s["steps"] == 40 and s["resumed_from"] is not None
    stopped_at = int(Path(s["resumed_from"]).name.split("-")[-1])
    assert 3 <= stopped_at < 40 and s["steps_this_launch"] == 40 - stopped_at
    steps = [r["step"] for r in metric_lines(out) if "split" not in r]
    assert steps == list(range(1, 41)), "every step trained and logged exactly once"
    log = (out / "slurm.log").read_text()
    assert "(restart 0)" in log and "(restart 1)" in log, "both runs of the job log into one file"
    assert "requeued" in log and re.search(r"restarts 1\b", output)
    # the requeued job continued the tracker run it started (its id in the checkpoint): each step once
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = json.loads((out / "trackers.json").read_text())["runs"]
    assert checkpoint.read_state(Path(s["resumed_from"])).trackers == runs
    events = EventAccumulator(runs["tensorboard"])
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 41))


def test_killed_rank_fails_the_job_fast_naming_node_and_rank(slurm_cluster, tiny, tmp_path):
    out = tmp_path / "run"
    proc = _start(
        [
            *tiny_run(tiny["bert"], out, "train.max_steps=100000"),
            "--nodes",
            "2",
            "--cluster",
            cpu_profile(tmp_path),
            "--follow",
        ],
        {**ENV, "LAUNCHER_FAULT": "rank=1,step=5"},
    )
    try:
        _wait_for_step(proc, out, 1)
        started = time.time()
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert time.time() - started < 60, "a dead rank ends the job within a minute"
    assert proc.returncode == 1, output[-4000:]
    assert "FAILED" in output
    assert re.search(r"training failed on node n[12] .*\n.*rank 1 \(local rank 0 on n[12].*SIGKILL", output), output[
        -4000:
    ]
    assert not (out / "summary.json").exists()


def test_real_sbatch_reads_every_directive_of_a_hostile_run_directory(slurm_cluster, tmp_path):
    """What tests/integration/test_slurm_script_safety.py checks with its stub sbatch, against the real one: a run
    directory named with spaces, #, %, quotes and a command substitution keeps every directive, and the log path
    Slurm will write is the run's own. The job is held, read back with scontrol and cancelled, never run."""
    from launcher.backends.slurm.script import render_script
    from launcher.config.cluster import SlurmProfile
    from launcher.config.loading import load_recipe
    from launcher.planning.plan import make_plan

    run_dir = tmp_path / """run x#y %j 'q' "dq" $(touch owned)"""
    run_dir.mkdir()
    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"output_dir={run_dir}"])
    plan = make_plan(recipe, num_train_samples=800, procs_per_node=1, num_nodes=2)
    script = run_dir / "job.sbatch"
    script.write_text(render_script(recipe, plan, SlurmProfile(time="00:07:00")))
    done = subprocess.run(["sbatch", "--hold", "--parsable", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    try:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    # the log path as sbatch stored it: `scontrol show job` (Slurm 22.05) expands the pattern for display, and
    # shows the escaped %%j of the folder's name as %<job id>; the rest of the path is the run's own
    stdout = next(line.split("=", 1)[1] for line in shown.splitlines() if line.strip().startswith("StdOut="))
    assert stdout in (f"{run_dir / 'slurm.log'}", f"{run_dir / 'slurm.log'}".replace("%j", f"%{job_id}")), shown
    assert f"JobName={run_dir.name}\n" in shown and "TimeLimit=00:07:00" in shown and "NumNodes=2" in shown, shown
    assert "Requeue=1" in shown, shown
    assert not list(tmp_path.rglob("owned")), "nothing ran"
