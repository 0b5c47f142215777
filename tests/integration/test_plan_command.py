"""`launch plan` and the dry-run's memory estimate through the real command (the planner's arithmetic:
tests/unit/test_memory.py)."""

from __future__ import annotations

import time

from helpers import RECIPES, launch

from launcher.config.loading import load_recipe
from launcher.planning import memory
from launcher.planning.memory import Choice

GiB = 2**30


def test_launch_plan_prints_every_choice_and_the_auto_choice():
    start = time.time()
    run = launch("plan", RECIPES / "llama70b-zero3-offload.yaml", "--gpus-per-node", "4", "--gpu-memory", "80GiB")
    seconds = time.time() - start
    assert run.returncode == 0, run.output
    r = load_recipe(RECIPES / "llama70b-zero3-offload.yaml", [])
    shape = memory.model_shape(r)
    est = memory.estimate(shape, r, Choice("zero3", "cpu"), num_nodes=1, gpus_per_node=4, micro_batch=1)
    row = next(line for line in run.stdout.splitlines() if "zero3 + cpu optimizer " in line)
    assert memory.gib(est.per_gpu) in row and memory.gib(est.host_per_node) in row and "yes" in row
    assert "auto: zero3 + cpu optimizer (fastest that fits" in run.stdout
    for label in ("ddp", "zero1", "zero2", "fsdp", "zero3 + cpu optimizer+parameters", "zero3 + nvme"):
        assert f"│ {label} " in run.stdout
    assert "refused: offload: nvme needs nvme_path" in run.stdout
    widest = max(len(line) for line in run.stdout.splitlines())
    assert widest <= 100, f"the plan is {widest} columns wide; it must read in a 100-column terminal"
    assert seconds < 120, f"a 70B plan took {seconds:.0f} s"  # about 20 s under load here; it reads no weights


def test_launch_plan_takes_the_gpu_memory_from_the_cluster_profile_or_refuses_without_it(tmp_path):
    run = launch("plan", RECIPES / "llama70b-zero3-offload.yaml")
    assert run.returncode == 2 and "Traceback" not in run.output
    assert "--gpus-per-node" in run.stderr and "--gpu-memory: give the memory per GPU" in run.stderr
    profile = tmp_path / "local.yaml"
    profile.write_text("backend: local\ngpu_memory: 40GiB\n")
    run = launch("plan", RECIPES / "llama70b-zero3-offload.yaml", "--cluster", profile, "--gpus-per-node", "8")
    assert run.returncode == 0, run.output
    assert "8 GPUs of 40.0 GiB (36.0 GiB usable)" in run.stdout and "auto: zero3 + cpu optimizer (" in run.stdout


def test_dry_run_of_the_70b_recipe_shows_its_estimate_and_training_is_refused_without_weights(tmp_path):
    run = launch(RECIPES / "llama70b-zero3-offload.yaml", "--dry-run", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.output
    table = " ".join(run.stdout.replace("│", " ").split())  # the table wraps long values
    r = load_recipe(RECIPES / "llama70b-zero3-offload.yaml", [])
    est = memory.estimate(memory.model_shape(r), r, Choice("zero3", "cpu"), num_nodes=1, gpus_per_node=1, micro_batch=1)
    assert "strategy zero3 + cpu optimizer" in table
    # planned here on a CPU process (no GPU on this machine): its memory is host RAM, the same arithmetic
    assert f"memory per process (estimate) {memory.gib(est.per_gpu)} = parameters {memory.gib(est.parameters)}" in table
    assert f"host RAM per node {memory.gib(est.host_per_node)}" in table
    run = launch(RECIPES / "llama70b-zero3-offload.yaml", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 2 and "has a config but no weights" in run.stderr
    assert not (tmp_path / "run").exists()
