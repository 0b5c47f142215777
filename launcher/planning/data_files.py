"""Reading the recipe's data files into clean train/validation/test rows.

Runs in the launcher before any rank starts (so a bad label or a missing file
costs nothing) and again inside train.run on the same files (cheap, and the
tokenized result is cached by content hash). No torch import here.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError
from launcher.planning.chat_checks import RowsCheck

SPLITS = ("train", "validation", "test")
READERS = ".jsonl .json .csv .tsv .parquet, or a folder written by datasets' save_to_disk"


@dataclass
class Splits:
    """Clean rows per split: model inputs plus an integer/float/list `label` where the task has one."""

    train: list[dict]
    validation: list[dict]
    test: list[dict]
    dropped: dict[str, int]
    notes: tuple[str, ...] = ()  # warnings of the row checks (planning.chat_checks)

    def items(self):
        return (("train", self.train), ("validation", self.validation), ("test", self.test))


def read_table(path: Path, recipe: Recipe) -> list[dict]:
    """Rows of one file as dicts. Raises ValueError with a user-facing reason."""
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise ValueError(
                f"{path} is a folder but not a saved HF dataset (no dataset_info.json); readers: {READERS}"
            )
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{path} holds several splits ({', '.join(loaded)}); point to one split's folder")
        return loaded.to_list()
    if not path.is_file():  # a FIFO or a device would block the reader, or never end
        raise ValueError(f"{path} is not a regular file (a pipe or device?); readers: {READERS}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path} is not readable by this user (permissions)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        delimiter = recipe.data.csv_delimiter or ("\t" if suffix == ".tsv" else ",")
        try:
            frame = pd.read_csv(
                path,
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                header=0 if recipe.data.csv_header else None,
                names=recipe.data.csv_columns,
                quoting=3 if delimiter == "\t" else 0,
            )
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ValueError(f"cannot read {path} as CSV: {str(exc).splitlines()[0]}") from None
        return frame.to_dict(orient="records")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise ValueError(f"cannot read {path} as parquet: {exc}") from None
    raise ValueError(f"unsupported file type {suffix!r} for {path}; readers: {READERS}")


def _read_json(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {number} is {type(row).__name__}, expected an object")
    return rows


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return True
    return False


class _LabelMapper:
    """Turns a label as written in the data (name or index) into the model's target."""

    def __init__(self, recipe: Recipe):
        self.task = recipe.task
        self.num_labels = recipe.task.resolved_num_labels
        self.index = {name: i for i, name in enumerate(recipe.task.labels or [])}

    def valid(self) -> str:
        if self.index:
            return f"one of {list(self.index)} (or 0..{self.num_labels - 1})"
        return f"an integer 0..{self.num_labels - 1}"

    def one(self, value: Any) -> int:
        if isinstance(value, str) and value in self.index:
            return self.index[value]
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and 0 <= value < self.num_labels:
            return value
        raise ValueError

    def __call__(self, value: Any) -> Any:
        """The label as the task's label kind (config.tasks.LabelKind) has it."""
        kind = self.task.spec.label
        if kind == "class":
            return self.one(value)
        if kind == "number":
            return float(value)
        if kind == "multi_hot":
            items = value if isinstance(value, list) else [v for v in str(value).split(",") if v.strip()]
            hot = [0.0] * self.num_labels
            for item in items:
                hot[self.one(item.strip() if isinstance(item, str) else item)] = 1.0
            return hot
        if kind == "tags":
            if not isinstance(value, list):
                raise ValueError
            return [self.one(v) for v in value]
        raise AssertionError(kind)


def _clean(rows: list[dict], recipe: Recipe, field_prefix: str) -> tuple[list[dict], list[Problem], int]:
    """Keep the columns the task uses, map labels, apply the missing-value policy."""
    spec = recipe.task.spec
    columns = spec.columns(recipe.data)
    problems: list[Problem] = []
    if rows:
        absent = [src for src in columns.values() if src not in rows[0]]
        if absent:
            have = ", ".join(map(str, rows[0].keys()))
            for src in absent:
                name = next(k for k, v in columns.items() if v == src)
                field = {
                    "text": "text_field",
                    "text_pair": "text_pair_field",
                    "label": "label_field",
                    "prompt": "prompt_field",
                    "response": "response_field",
                    "messages": "messages_field",
                    "chosen": "chosen_field",
                    "rejected": "rejected_field",
                }[name]
                problems.append(Problem(f"data.{field}", f"column {src!r} is not in {field_prefix} (columns: {have})"))
            return [], problems, 0
    mapper = _LabelMapper(recipe) if "label" in columns else None
    clean, missing_rows, bad_labels = [], [], []
    for number, row in enumerate(rows, start=1):
        values = {name: row.get(src) for name, src in columns.items()}
        if any(_missing(v) for v in values.values()):
            missing_rows.append(number)
            continue
        if spec.words and not isinstance(values["text"], list):
            bad_labels.append((number, "text is not a list of words"))
            continue
        if mapper is not None:
            try:
                values["label"] = mapper(values["label"])
            except (ValueError, TypeError, IndexError):
                bad_labels.append((number, values["label"]))
                continue
            if spec.words and len(values["label"]) != len(values["text"]):
                bad_labels.append((number, f"{len(values['text'])} words but {len(values['label'])} tags"))
                continue
        clean.append(values)
    if bad_labels:
        shown = "; ".join(f"row {n}: {v!r}" for n, v in bad_labels[:5])
        more = f" (and {len(bad_labels) - 5} more)" if len(bad_labels) > 5 else ""
        valid = mapper.valid() if mapper else ""
        if spec.label == "number":
            valid = "a number"
        problems.append(
            Problem(
                "data.label_field",
                f"{len(bad_labels)} rows of {field_prefix} have an invalid label; expected {valid}: {shown}{more}",
            )
        )
    dropped = 0
    if missing_rows:
        if recipe.data.on_missing == "error":
            shown = ", ".join(map(str, missing_rows[:10])) + (" ..." if len(missing_rows) > 10 else "")
            problems.append(
                Problem(
                    "data.on_missing",
                    f"{len(missing_rows)} rows of {field_prefix} have an empty "
                    f"{'/'.join(columns.values())} (rows {shown}); set data.on_missing=drop to skip them",
                )
            )
        else:
            dropped = len(missing_rows)
    return clean, problems, dropped


def load_splits(recipe: Recipe) -> Splits:
    """Read, clean and split the data; every problem of every file in one RecipeError."""
    data = recipe.data
    problems: list[Problem] = []
    tables: dict[str, list[dict]] = {}
    dropped: dict[str, int] = {}
    rows_check = RowsCheck(recipe) if recipe.task.spec.renders_chats else None
    for split in SPLITS:
        file = getattr(data, split)
        if file is None:
            continue
        try:
            raw = read_table(Path(file), recipe)
        except ValueError as exc:
            problems.append(Problem(f"data.{split}", str(exc)))
            continue
        rows, found, dropped[split] = _clean(raw, recipe, f"{split} file {Path(file).name}")
        if rows_check is not None and not found:
            rows, found = rows_check(rows, f"{split} file {Path(file).name}")
        problems += found
        if not raw:
            problems.append(Problem(f"data.{split}", f"{file} holds no rows"))
        elif not rows and not found:
            problems.append(Problem(f"data.{split}", f"no usable rows left in {file} after dropping empty ones"))
        tables[split] = rows
    if rows_check is not None:
        problems += rows_check.problems
    if problems:
        raise RecipeError("data", problems)
    train = tables["train"]
    carve = {s: getattr(data.split, s) for s in ("validation", "test") if getattr(data, s) is None}
    if any(carve.values()):
        order = list(range(len(train)))
        random.Random(data.seed).shuffle(order)
        start = 0
        for split, ratio in carve.items():
            count = int(round(len(train) * ratio))
            tables[split] = [train[i] for i in order[start : start + count]]
            start += count
        train = [train[i] for i in sorted(order[start:])]
    if not train:
        raise RecipeError("data", [Problem("data.split", "the split leaves no training rows")])
    notes = tuple(rows_check.notes) if rows_check is not None else ()
    return Splits(train, tables.get("validation", []), tables.get("test", []), dropped, notes)


def label_counts(rows: list[dict], num_labels: int) -> list[int]:
    counts = [0] * num_labels
    for row in rows:
        label = row["label"]
        for value in label if isinstance(label, list) else [label]:
            if value >= 0:
                counts[int(value)] += 1
    return counts
