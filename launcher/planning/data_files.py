"""The data checks before launch, and the clean rows the tokenized cache is built from: one code path.

`check_data` streams every source of the recipe in batches (launcher.planning.sources) through a `Cleaner`,
which keeps the columns the task uses, maps labels by the task's label kind and applies the missing-value
policy, noting each problem with its row numbers (the first few) and a count. Nothing of a file is kept but
counts and its fingerprint, so the check runs in bounded memory whatever the size; every problem of every
source comes back in one RecipeError. The cache (launcher.train.data) reads the same sources through the same
Cleaner, so what was checked is what gets tokenized. With data.streaming the training sources are larger than
the disk: the checks read their first STREAM_CHECK_ROWS rows, and the ranks check the rest as they stream.
No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config.recipe import Recipe, SourceConfig
from launcher.errors import Problem, RecipeError
from launcher.planning.chat_checks import RowFailures, RowsCheck
from launcher.planning.readers import SourceError
from launcher.planning.sources import Batch, Fingerprint, ResolvedSource, resolve

SPLITS = ("train", "validation", "test")
STREAM_CHECK_ROWS = 1000  # data.streaming: rows of each training source checked before launch
FIELDS = {  # row field → the recipe's setting that names its column
    "text": "text_field",
    "text_pair": "text_pair_field",
    "label": "label_field",
    "prompt": "prompt_field",
    "response": "response_field",
    "messages": "messages_field",
    "chosen": "chosen_field",
    "rejected": "rejected_field",
}
TEXTS = ("text", "text_pair", "prompt", "response")  # row fields the tokenizer reads as strings
SHOWN_LABELS, SHOWN_MISSING = 5, 10


@dataclass
class SourceCheck:
    """What the checks found in one source: its clean rows, the rows dropped, and its fingerprint."""

    split: str  # the recipe field it comes from: train, validation or test
    index: int  # its position in data.train (0 for validation and test)
    label: str
    rows: int
    dropped: int
    fingerprint: str  # the source as written, its files' names and sizes, and the bytes read (streaming: no bytes)
    weight: float | None = None
    checked_all: bool = True  # False: data.streaming, only the first rows were read


@dataclass
class DataSummary:
    """The data as the plan needs it: rows per split (after the seeded carve) and per source."""

    sources: list[SourceCheck]
    counts: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)
    streaming: bool = False
    notes: tuple[str, ...] = ()  # warnings of the row checks (planning.chat_checks)

    def of(self, split: str) -> list[SourceCheck]:
        return [s for s in self.sources if s.split == split]


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
        if self.task.spec.label == "number":
            return "a number (finite: not inf or nan)"
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

    def number(self, value: Any) -> float:
        """A regression target: inf, nan, "inf", "nan" and 1e400 (read as inf) would make the loss inf or nan."""
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number

    def __call__(self, value: Any) -> Any:
        """The label as the task's label kind (config.tasks.LabelKind) has it."""
        kind = self.task.spec.label
        if kind == "class":
            return self.one(value)
        if kind == "number":
            return self.number(value)
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


class ColumnsMissing(Exception):
    """A file lacks a column the task reads: the rest of the source is not worth reading."""


@dataclass
class _Seen:
    """Rows of one kind of problem: how many, and the first few (file, row, detail)."""

    count: int = 0
    first: list = field(default_factory=list)

    def add(self, file: str, row: int, detail: Any, keep: int) -> None:
        self.count += 1
        if len(self.first) < keep:
            self.first.append((file, row, detail))


class Cleaner:
    """Raw rows of one source → clean rows (model inputs, labels mapped), problems noted with row numbers.

    `where` names the source in messages ("train file bad.jsonl"); row numbers count the records of each file
    from 1 (blank lines skipped), and name the file too when the source has several."""

    def __init__(self, recipe: Recipe, where: str, several_files: bool = False, rows_check: RowsCheck | None = None):
        self.recipe, self.where, self.several, self.rows_check = recipe, where, several_files, rows_check
        self.chat = RowFailures(recipe) if rows_check is not None else None  # conversations and pairs
        self.spec = recipe.task.spec
        self.columns = self.spec.columns(recipe.data)
        self.mapper = _LabelMapper(recipe) if "label" in self.columns else None
        self.rows = self.dropped = 0
        self.bad_labels, self.missing, self.not_text = _Seen(), _Seen(), _Seen()
        self.absent: list[Problem] = []

    def clean(self, batch: Batch) -> list[dict]:
        if batch.first == 1 and batch.rows:
            self._check_columns(batch)
        spec, mapper, out = self.spec, self.mapper, []
        for number, row in enumerate(batch.rows, start=batch.first):
            values = {name: row.get(src) for name, src in self.columns.items()}
            if any(_missing(v) for v in values.values()):
                self.missing.add(batch.file, number, None, SHOWN_MISSING)
                continue
            if spec.words and not isinstance(values["text"], list):
                self.bad_labels.add(batch.file, number, "text is not a list of words", SHOWN_LABELS)
                continue
            if self.rows_check is not None:  # conversations and pairs: text or messages, checked as a whole
                failure = self.rows_check.failure(values)
                if failure is not None:
                    self.chat.add(self._row(batch.file, number), failure)
                    continue
                out.append(values)
                continue
            odd = next((n for n in TEXTS if n in values and not spec.words and not isinstance(values[n], str)), None)
            if odd is not None:
                self.not_text.add(batch.file, number, (odd, values[odd]), SHOWN_LABELS)
                continue
            if mapper is not None:
                try:
                    values["label"] = mapper(values["label"])
                except (ValueError, TypeError, IndexError, OverflowError):
                    self.bad_labels.add(batch.file, number, values["label"], SHOWN_LABELS)
                    continue
                if spec.words and len(values["label"]) != len(values["text"]):
                    detail = f"{len(values['text'])} words but {len(values['label'])} tags"
                    self.bad_labels.add(batch.file, number, detail, SHOWN_LABELS)
                    continue
            out.append(values)
        self.rows += len(out)
        return out

    def _check_columns(self, batch: Batch) -> None:
        first = batch.rows[0]
        absent = [(name, src) for name, src in self.columns.items() if src not in first]
        if absent:
            have = ", ".join(map(str, first.keys()))
            where = self.where if not self.several else f"{self.where} ({Path(batch.file).name})"
            for name, src in absent:
                message = f"column {src!r} is not in {where} (columns: {have})"
                self.absent.append(Problem(f"data.{FIELDS[name]}", message))
            raise ColumnsMissing

    def _row(self, file: str, number: int) -> str:
        return f"row {number}" + (f" of {Path(file).name}" if self.several else "")

    @property
    def fatal(self) -> bool:
        """Rows that cannot be trained on: refused (whatever on_missing says for empty ones)."""
        return bool(self.absent or self.bad_labels.count or self.not_text.count or (self.chat and self.chat.fatal))

    def problems(self) -> list[Problem]:
        if self.absent:
            return list(self.absent)
        problems = []
        if self.bad_labels.count:
            shown = "; ".join(f"{self._row(f, n)}: {v!r}" for f, n, v in self.bad_labels.first)
            more = f" (and {self.bad_labels.count - SHOWN_LABELS} more)" if self.bad_labels.count > SHOWN_LABELS else ""
            valid = self.mapper.valid() if self.mapper else ""
            problems.append(
                Problem(
                    "data.label_field",
                    f"{self.bad_labels.count} rows of {self.where} have an invalid label; expected {valid}: "
                    f"{shown}{more}",
                )
            )
        if self.not_text.count:
            shown = "; ".join(f"{self._row(f, n)}: {v[0]} is {v[1]!r}" for f, n, v in self.not_text.first)
            name = self.not_text.first[0][2][0]
            problems.append(
                Problem(
                    f"data.{FIELDS[name]}",
                    f"{self.not_text.count} rows of {self.where} have a {name} that is not text: {shown}",
                )
            )
        if self.missing.count:
            if self.recipe.data.on_missing == "error":
                rows = [n for _, n, _ in self.missing.first] if not self.several else []
                listed = ", ".join(map(str, rows)) or "; ".join(self._row(f, n) for f, n, _ in self.missing.first)
                shown = listed + (" ..." if self.missing.count > SHOWN_MISSING else "")
                problems.append(
                    Problem(
                        "data.on_missing",
                        f"{self.missing.count} rows of {self.where} have an empty "
                        f"{'/'.join(self.columns.values())} (rows {shown}); set data.on_missing=drop to skip them",
                    )
                )
            else:
                self.dropped = self.missing.count
        if self.chat is not None:
            problems += self.chat.problems(self.where)
            self.dropped = (self.missing.count if self.recipe.data.on_missing == "drop" else 0) + self.chat.dropped
        return problems


def describe(source: SourceConfig, split: str, resolved: ResolvedSource | None) -> str:
    """How messages name a source: 'train file bad.jsonl' (one local file), else 'train source PATH'."""
    files = resolved.files if resolved is not None else []
    if len(files) == 1 and not source.is_hub and files[0].location == source.path:
        return f"{split} file {Path(source.path).name}"
    return f"{split} source {source.label}"


def sources_of(recipe: Recipe) -> Iterator[tuple[str, int, SourceConfig]]:
    """(split, index, source) for every source of the recipe: the training sources, then validation, test."""
    for index, source in enumerate(recipe.data.train):
        yield "train", index, source
    for split in ("validation", "test"):
        source = getattr(recipe.data, split)
        if source is not None:
            yield split, 0, source


def clean_batches(
    recipe: Recipe, resolved: ResolvedSource, fingerprint: Fingerprint | None = None
) -> Iterator[list[dict]]:
    """The clean rows of one source, a batch at a time; RecipeError (exit 2) on the first problem that the
    checks would have refused, naming the rows (what the ranks see when data.streaming meets a bad row)."""
    rows_check = RowsCheck(recipe) if recipe.task.spec.renders_chats else None
    if rows_check is not None and rows_check.problems:
        raise RecipeError("data", rows_check.problems)
    where = describe(resolved.config, resolved.role, resolved)
    cleaner = Cleaner(recipe, where, len(resolved.files) > 1, rows_check)
    try:
        for batch in resolved.batches(recipe, fingerprint):
            rows = cleaner.clean(batch)
            problems = cleaner.problems()
            if cleaner.fatal or (problems and recipe.data.on_missing == "error"):
                raise RecipeError("data", problems)
            yield rows
    except ColumnsMissing:
        raise RecipeError("data", cleaner.problems()) from None


def check_source(
    recipe: Recipe, split: str, index: int, source: SourceConfig, rows_check: RowsCheck | None = None
) -> tuple[SourceCheck, list[Problem], list[str]]:
    """Stream one source through the Cleaner (and the conversation/pair row checks): its counts and
    fingerprint, its problems, and notes to warn about."""
    field_name = f"data.{split}" + (f".{index}" if split == "train" and len(recipe.data.train) > 1 else "")
    streaming = recipe.data.streaming and split == "train"
    try:
        resolved = resolve(source, split, streaming=streaming)
    except SourceError as exc:
        return SourceCheck(split, index, source.label, 0, 0, ""), [Problem(field_name, str(exc))], []
    from launcher.planning.data_cache import CheckMemo

    memo = CheckMemo(recipe, resolved, rows_check) if not streaming else None
    remembered = memo.get() if memo is not None else None
    if remembered is not None:  # these very files (size, time, inode) passed these checks before
        rows, dropped, digest = remembered
        return SourceCheck(split, index, source.label, rows, dropped, digest, source.weight), [], []
    fingerprint = Fingerprint(*resolved.identity())
    cleaner = Cleaner(recipe, describe(source, split, resolved), len(resolved.files) > 1, rows_check)
    raw, problems = 0, []
    try:
        for batch in resolved.batches(recipe, None if streaming else fingerprint):
            raw += len(batch.rows)
            cleaner.clean(batch)
            if streaming and raw >= STREAM_CHECK_ROWS:
                break
    except SourceError as exc:
        problems.append(Problem(field_name, str(exc)))
    except ColumnsMissing:
        pass
    problems += cleaner.problems()
    if not problems and not raw:
        problems.append(Problem(field_name, f"{source.label} holds no rows"))
    elif not problems and not cleaner.rows:
        problems.append(Problem(field_name, f"no usable rows left in {source.label} after dropping empty ones"))
    check = SourceCheck(
        split, index, source.label, cleaner.rows, cleaner.dropped, fingerprint.hexdigest(), source.weight, not streaming
    )
    if memo is not None and not problems:
        memo.put(check.rows, check.dropped, check.fingerprint)
    note = cleaner.chat.note(cleaner.where) if cleaner.chat is not None else None
    return check, problems, [note] if note else []


def carve_counts(num_rows: int, recipe: Recipe) -> dict[str, int]:
    """Rows of each split of one training source after the seeded carve (validation/test without a source of
    their own get round(rows × ratio) each; train keeps the rest)."""
    counts = {"validation": 0, "test": 0}
    for split in counts:
        if getattr(recipe.data, split) is None:
            counts[split] = int(round(num_rows * getattr(recipe.data.split, split)))
    return {"train": num_rows - counts["validation"] - counts["test"], **counts}


def split_indices(num_rows: int, recipe: Recipe, index: int):
    """The seeded carve of training source `index`: row indices (numpy, sorted) of each split."""
    import numpy as np

    counts = carve_counts(num_rows, recipe)
    order = np.random.default_rng([recipe.data.seed, index]).permutation(num_rows)
    val_end = counts["validation"]
    test_end = val_end + counts["test"]
    return {
        "validation": np.sort(order[:val_end]),
        "test": np.sort(order[val_end:test_end]),
        "train": np.sort(order[test_end:]),
    }


def check_data(recipe: Recipe) -> DataSummary:
    """Every source checked, counted and fingerprinted; every problem of every source in one RecipeError."""
    rows_check = RowsCheck(recipe) if recipe.task.spec.renders_chats else None
    problems: list[Problem] = list(rows_check.problems) if rows_check is not None else []
    notes: list[str] = list(rows_check.notes) if rows_check is not None else []
    checks: list[SourceCheck] = []
    for split, index, source in sources_of(recipe):
        check, found, noted = check_source(recipe, split, index, source, rows_check)
        checks.append(check)
        problems += found
        notes += noted
    if problems:
        raise RecipeError("data", problems)
    counts = {split: 0 for split in SPLITS}
    for check in checks:
        if check.split == "train" and not recipe.data.streaming:
            for split, n in carve_counts(check.rows, recipe).items():
                counts[split] += n
        elif check.split != "train":
            counts[check.split] += check.rows
    if not recipe.data.streaming and not counts["train"]:
        raise RecipeError("data", [Problem("data.split", "the split leaves no training rows")])
    dropped = {}
    for check in checks:
        dropped[check.split] = dropped.get(check.split, 0) + check.dropped
    return DataSummary(checks, counts, dropped, recipe.data.streaming, tuple(notes))


def label_counts(labels, num_labels: int) -> list[int]:
    """Rows per class (a list label counts each of its classes; negative entries are ignored)."""
    counts = [0] * num_labels
    for label in labels:
        for value in label if isinstance(label, list) else [label]:
            if value >= 0:
                counts[int(value)] += 1
    return counts
