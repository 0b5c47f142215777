"""One run owns its output_dir (launcher/ownership.py) and the launcher deletes only what it wrote
(train/checkpoint.py): which folders are refused, the lock between two launches in this process, retention
that leaves other folders and symbolic links alone, the export through a symbolic link, and the small
conditions a resume now tolerates or names (a torn metrics line, a full disk, an unreadable RNG state).
A holder that dies is in tests/integration/test_run_lifecycle.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers import REPO

from launcher import ownership
from launcher.errors import RecipeError
from launcher.train import checkpoint


def names(problems) -> list[str]:
    return [p.message for p in problems]


def test_which_folders_a_run_may_write_into(tmp_path):
    assert ownership.folder_problems(str(tmp_path / "new")) == []
    (tmp_path / "empty").mkdir()
    assert ownership.folder_problems(str(tmp_path / "empty")) == []
    theirs = tmp_path / "theirs"
    (theirs / "final").mkdir(parents=True)
    (theirs / "metrics.jsonl").write_text("{}\n")
    [problem] = names(ownership.folder_problems(str(theirs)))
    assert "already holds files that launch did not write (final, metrics.jsonl)" in problem
    assert f"output_dir={theirs / 'run'}" in problem, "a way out"
    (theirs / "launch").mkdir()
    (theirs / "launch" / "lock").write_text("{}")
    assert ownership.folder_problems(str(theirs)) == [], "a run of the launcher"
    for protected, why in [("/", "the root of the file system"), (str(Path.home()), "your home folder"),
                           (str(REPO), "the launcher's own repository")]:  # fmt: skip
        [problem] = names(ownership.folder_problems(protected))
        assert why in problem
    source = tmp_path / "project"
    (source / ".git").mkdir(parents=True)
    (source / "launch").mkdir()
    (source / "launch" / "lock").write_text("{}")
    assert "a source tree" in names(ownership.folder_problems(str(source)))[0], "even with a marker"


def test_a_second_claim_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    assert ownership.in_use(run) is None
    with ownership.claim(run):
        record = json.loads(ownership.lock_path(run).read_text())
        assert record["pid"] == os.getpid()
        holder = ownership.in_use(run)
        assert f"`launch` pid {os.getpid()} on host {record['host']}" in holder
        with pytest.raises(RecipeError, match=f"is in use by `launch` pid {os.getpid()}"), ownership.claim(run):
            pass
    assert ownership.in_use(run) is None, "released with the claim"
    with ownership.claim(run):
        pass


def checkpoint_folder(run: Path, step: int, manifest: bool = True) -> Path:
    folder = run / f"checkpoint-{step:08d}"
    folder.mkdir(parents=True)
    (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    if manifest:
        checkpoint.write_manifest(folder, hash_files=False)
    return folder


def test_retention_deletes_only_the_runs_own_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        checkpoint_folder(run, step)
    foreign = checkpoint_folder(run, 90, manifest=False)  # another tool's, or copied in by hand
    elsewhere = checkpoint_folder(tmp_path / "kept", 99)
    (run / "checkpoint-00000100").symlink_to(elsewhere)
    tmp_target = tmp_path / "not-a-temp"
    tmp_target.mkdir()
    (run / ".tmp-checkpoint-00000004").symlink_to(tmp_target)
    (run / ".tmp-checkpoint-00000005").mkdir()
    notes = []
    checkpoint.prune(run, keep_last=1, note=notes.append)
    left = sorted(p.name for p in run.iterdir())
    assert left == [".tmp-checkpoint-00000004", "checkpoint-00000003", "checkpoint-00000090", "checkpoint-00000100"]
    assert foreign.is_dir() and (elsewhere / checkpoint.STATE_FILE).exists() and tmp_target.is_dir()
    assert notes == [
        "retention leaves checkpoint-00000090, checkpoint-00000100 alone: not a checkpoint folder this launcher "
        "wrote (a symbolic link, or no manifest)"
    ]


def test_a_symbolic_link_in_place_of_final_is_replaced_not_followed(tmp_path):
    class Saves:
        def save_pretrained(self, folder, state_dict=None):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_text("new")

    target = tmp_path / "someone-elses-model"
    target.mkdir()
    (target / "model.safetensors").write_text("theirs")
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(target)
    checkpoint.export(Saves(), Saves(), run / "final")
    assert not (run / "final").is_symlink() and (run / "final" / "model.safetensors").read_text() == "new"
    assert (target / "model.safetensors").read_text() == "theirs"


def test_a_torn_metrics_line_is_dropped_and_said(tmp_path):
    from launcher.train.report import truncate_metrics

    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')

    class Log:
        said = []

        def warning(self, text):
            self.said.append(text)

    truncate_metrics(tmp_path, 2, Log())
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    assert "dropped 1 line(s) that are not JSON records (line 4" in Log.said[0]


def test_a_full_disk_during_a_checkpoint_write_is_named_and_the_partial_folder_removed(tmp_path):
    """(a real full file system: tests/integration/test_disk_full.py)"""
    run = tmp_path / "run"
    checkpoint_folder(run, 4)
    partial = run / ".tmp-checkpoint-00000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 1000)
    with pytest.raises(checkpoint.CheckpointWriteFailed) as failure:
        checkpoint.raise_write_failed(OSError(errno.ENOSPC, "No space left on device"), partial, run, 8)
    text = str(failure.value)
    assert text.startswith(f"the checkpoint of step 8 could not be written to {run} (the disk is full; ")
    assert " free of " in text and "checkpoint-00000004, is intact" in text
    assert not partial.exists()


def test_an_unreadable_rng_state_is_an_error_not_silence(tmp_path):
    run = tmp_path / "run"
    folder = checkpoint_folder(run, 2)
    (folder / "random_states_0.pkl").write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(checkpoint.CheckpointDamaged, match="random_states_0.pkl cannot be loaded"):
        checkpoint.restore_rng(folder, rank=0, seed=1, step=2)
    assert checkpoint.restore_rng(folder, rank=1, seed=1, step=2) is True, "no file: seeded from (seed, step, rank)"


def test_the_schedule_resumes_at_the_step_with_the_recipes_settings(tmp_path):
    """The LR schedule is not in a checkpoint: rebuilt at the resume step it matches an uninterrupted one, and a
    new lr or max_steps takes effect (what the saved optimizer held is overwritten)."""
    import torch

    from launcher.config.loading import load_recipe
    from launcher.planning.plan import make_plan
    from launcher.train.components import make_optimizer, make_scheduler

    def setup(*overrides):
        recipe = load_recipe(REPO / "recipes/quickstart.yaml", ["train.optimizer.lr=1e-3", *overrides])
        plan = make_plan(recipe, num_train_samples=800, procs_per_node=1)
        model = torch.nn.Linear(4, 4)
        return recipe, plan, make_optimizer(model, recipe)

    recipe, plan, optimizer = setup()
    scheduler = make_scheduler(optimizer, recipe, plan)
    lrs = []
    for _ in range(plan.total_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    for step in (1, 7, plan.total_steps - 1):
        recipe, plan, optimizer = setup()
        optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["initial_lr"] = 123.0  # a checkpoint's values
        assert make_scheduler(optimizer, recipe, plan, step).get_last_lr()[0] == pytest.approx(lrs[step - 1])
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[step - 1])
    recipe, plan, optimizer = setup("train.optimizer.lr=5e-4", "train.max_steps=80")
    resumed = make_scheduler(optimizer, recipe, plan, 40)
    assert resumed.get_last_lr()[0] == pytest.approx(5e-4 * (80 - 40) / (80 - plan.warmup_steps))


def test_a_carved_split_that_rounds_to_no_row_is_said(tmp_path):
    from launcher.config.loading import load_recipe
    from launcher.planning.checks import ignored_settings
    from launcher.planning.data_files import check_data

    recipe = load_recipe(REPO / "recipes/quickstart.yaml", ["data.validation=null", "data.split.validation=0.0005"])
    notes = ignored_settings(recipe, check_data(recipe))
    assert any("data.split.validation 0.0005 of 800 rows rounds to 0 rows: there is no evaluation" in n for n in notes)


def test_another_failure_of_a_checkpoint_write_is_raised_as_it_is(tmp_path):
    partial = tmp_path / ".tmp-checkpoint-00000002"
    partial.mkdir()
    with pytest.raises(TypeError, match="a bug"):
        checkpoint.raise_write_failed(TypeError("a bug"), partial, tmp_path, 2)
    assert not partial.exists()
