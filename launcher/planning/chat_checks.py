"""The checks of conversations and preference pairs before launch, with row numbers.

The structure of each row (roles, an assistant turn, not a tool turn last, two different answers) needs
nothing but the row. Rendering and truncation need the tokenizer: its files are read here without torch
(tokenizer.json through the `tokenizers` library, the template and special tokens from its config), from
the model folder or the Hugging Face cache, and every row goes through the same `PairEncoder` the ranks
tokenize with. A hub model that is not downloaded yet cannot be rendered here: the launcher says so and
the ranks, which run these checks again once they have the tokenizer, stop on any problem.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from launcher.config.loading import resolve_model_path
from launcher.errors import Problem
from launcher.planning.conversations import (
    PairEncoder,
    RowProblem,
    conversation_problem,
    pair_encoder,
    pair_problem,
    recipe_template,
)

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SHOWN = 5  # rows named per problem


def tokenizer_folder(recipe) -> Path | None:
    """Where the tokenizer's files are on this machine: the model folder, or the hub cache (None: not here)."""
    path = resolve_model_path(recipe.model.path)
    if Path(path).is_dir():
        return Path(path) if (Path(path) / "tokenizer.json").exists() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(path, "tokenizer.json", revision=recipe.model.revision)
    except ValueError:  # not a valid repository id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


@functools.lru_cache(maxsize=4)
def _tokenizer_files(folder: Path) -> tuple[object, str | None, dict[str, str]]:
    """The tokenizer (tokenizers.Tokenizer), its chat template and its special tokens, as transformers loads
    them: chat_template.jinja before the config's entry, a named set's "default"."""
    from tokenizers import Tokenizer

    config = _read_json(folder / "tokenizer_config.json")
    specials = {**_read_json(folder / "special_tokens_map.json"), **config}
    variables = {name: _token(specials[name]) for name in SPECIAL_TOKENS if _token(specials.get(name))}
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # a tokenizer.json may pad or truncate every encoding; transformers turns both off
    tokenizer.no_truncation()
    return tokenizer, template, variables


def file_encoder(recipe, folder: Path | str) -> PairEncoder:
    """The recipe's PairEncoder over the tokenizer files in `folder` (what the launcher checks rows with)."""
    tokenizer, template, variables = _tokenizer_files(Path(folder))

    def encode(text: str, special: bool):
        encoding = tokenizer.encode(text, add_special_tokens=special)
        return encoding.ids, encoding.offsets

    return pair_encoder(recipe, template, variables, encode, variables.get("eos_token"))


def _listed(failures: list[tuple[str, str]]) -> str:
    """Rows grouped by reason: 'rows 2, 5: reason; row 7: other reason' (a few of each)."""
    by_reason: dict[str, list[int]] = {}
    for number, why in failures:
        by_reason.setdefault(why, []).append(number)
    parts = []
    for why, numbers in list(by_reason.items())[:SHOWN]:
        shown = ", ".join(map(str, numbers[:10])) + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
        parts.append(f"row{'s' if len(numbers) > 1 else ''} {shown}: {why}")
    more = len(by_reason) - SHOWN
    return "; ".join(parts) + (f" (and {more} other reasons)" if more > 0 else "")


def _rows(count: int) -> str:
    return f"{count} row{'s' if count != 1 else ''}"


def _field_and_column(recipe) -> tuple[str, str]:
    data = recipe.data
    if recipe.task.spec.rows == "conversation":
        return "data.messages_field", data.messages_field
    return "data.chosen_field", f"{data.prompt_field or 'prompt'}/{data.chosen_field}/{data.rejected_field}"


class RowsCheck:
    """The row checks of one recipe across its sources (the encoder is built once): `failure(row)` for one
    row, `problems` that concern every row (no template, an end-of-turn token that is not one token), and
    `notes` to warn about."""

    def __init__(self, recipe):
        self.recipe, self.problems, self.notes = recipe, [], []
        self.encoder: PairEncoder | None = None
        try:
            recipe_template(recipe)  # a template file the recipe names must be readable, whatever the model
        except RowProblem as exc:
            self.problems.append(Problem(exc.field, str(exc)))
            return
        folder = tokenizer_folder(recipe)
        if folder is None:
            self.notes.append(
                "the row checks that need the tokenizer (template rendering, end-of-turn tokens, truncation) run "
                f"when the cache is written: the tokenizer of {recipe.model.path} is not on this machine yet"
            )
            return
        try:
            self.encoder = file_encoder(recipe, folder)
        except RowProblem as exc:
            self.problems.append(Problem(exc.field, str(exc)))

    def failure(self, row: dict) -> tuple[str, str, bool] | None:
        return row_failure(row, self.recipe, self.encoder)


def row_failure(row: dict, recipe, encoder: PairEncoder | None) -> tuple[str, str, bool] | None:
    """Why the row cannot be trained on, as (field, reason, no answer token left); None: it can. `encoder`
    None: the structure only."""
    conversations = recipe.task.spec.rows == "conversation"
    problem = (conversation_problem if conversations else pair_problem)(row["messages"] if conversations else row)
    if problem:
        return _field_and_column(recipe)[0], problem, False
    if encoder is not None:
        try:
            encoder.conversation(row["messages"]) if conversations else encoder.pair(row)
        except RowProblem as exc:
            return exc.field, str(exc), exc.empty
    return None


class RowFailures:
    """The rows of one source that failed the RowsCheck: by field and reason, with their row names ('2', or
    '2 of b.jsonl' in a source of several files)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.invalid: dict[str, list[tuple[str, str]]] = {}
        self.empty: list[tuple[str, str]] = []

    def add(self, name: str, failure: tuple[str, str, bool]) -> None:
        field, why, empty = failure
        (self.empty if empty else self.invalid.setdefault(field, [])).append((name, why))

    @property
    def fatal(self) -> bool:
        return bool(self.invalid) or (bool(self.empty) and self.recipe.data.on_missing == "error")

    @property
    def dropped(self) -> int:
        """Rows dropped for having no answer token within max_length (data.on_missing=drop)."""
        return len(self.empty) if self.recipe.data.on_missing == "drop" else 0

    def problems(self, where: str) -> list[Problem]:
        data, column = self.recipe.data, _field_and_column(self.recipe)[1]
        problems = [
            Problem(field_, f"{_rows(len(found))} of {where} cannot be trained on ({column}): {_listed(found)}")
            for field_, found in self.invalid.items()
        ]
        if self.empty and data.on_missing == "error":
            problems.append(
                Problem(
                    "data.on_missing",
                    f"{_rows(len(self.empty))} of {where} with no answer token within data.max_length="
                    f"{data.max_length}: {_listed(self.empty)}; raise data.max_length, or set data.on_missing=drop "
                    "to skip them",
                )
            )
        return problems

    def note(self, where: str) -> str | None:
        if not self.dropped:
            return None
        return (
            f"dropped {_rows(self.dropped)} of {where} with no answer token within data.max_length="
            f"{self.recipe.data.max_length} (data.on_missing=drop)"
        )


def check_rows(rows: list[dict], recipe, where: str, encoder: PairEncoder | None) -> tuple[list, list, int]:
    """Rows that can train, the problems (one per kind, naming rows), and how many were dropped for having
    no answer token within max_length (data.on_missing=drop). `encoder` None: structure only."""
    failures, kept = RowFailures(recipe), []
    for number, row in enumerate(rows, start=1):
        failure = row_failure(row, recipe, encoder)
        if failure is None:
            kept.append(row)
        else:
            failures.add(str(number), failure)
    return kept, failures.problems(where), failures.dropped
