"""A wrong recipe is refused with every problem at once, each with field path, YAML line, value given, what is
valid, and a 'did you mean' for typos (in-process; through the real `launch`: tests/integration/test_cli_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import GOOD

from launcher.config.loading import load_recipe
from launcher.errors import RecipeError
from launcher.planning.checks import check_recipe


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
    summary = check_recipe(recipe)
    assert summary.counts["train"] == 3 and summary.dropped == {"train": 2}


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


def test_schema_errors_and_missing_files_reported_together(write):
    text = GOOD.replace("  batch_size: 8", "  batchsize: 8").replace(
        "  max_length: 32", "  max_length: 32\n  test: gone.csv"
    )
    message = problems(write(text))
    assert "2 problems" in message and "batchsize" in message and "data.test (line 9): file not found" in message


def test_balance_needs_single_label_classes(write):
    message = problems(write(GOOD), "task.type=regression", "task.labels=null", "data.balance=true")
    assert "data.balance needs single-label classes; task 'regression' has none to balance" in message
