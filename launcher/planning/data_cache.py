"""The tokenized cache, as the launcher sees it: where it is, what each entry is keyed by, whether it is ready.

One entry per source: a training source's entry holds its train part and what the seeded carve gives
validation and test; a validation or test source's entry holds all its rows. An entry's key hashes the cache
format, the tokenizer's files, the settings that change tokenization (task and data fields, except those
that only choose or order rows), the source's fingerprint (the bytes the checks read, with its files' names
and sizes: launcher.planning.readers.Fingerprint) and, for a carved training source, the split ratios, seed
and its position. A complete entry is a folder named by its key holding manifest.json, renamed into place by
its one writer (launcher.train.data.prepare_cache). The plan (DataPlan) carries the keys to the ranks, which
open the entries without reading the sources again. Torch-free.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from launcher.config.loading import resolve_model_path
from launcher.config.recipe import Recipe, is_url
from launcher.planning.data_files import DataSummary, SourceCheck
from launcher.planning.mixture import samples_per_epoch
from launcher.planning.readers import Fingerprint

CACHE_VERSION = "2"  # the layout of an entry; bump it when tokenization or the layout changes
MANIFEST = "manifest.json"
# data fields that choose or order rows, or say how to prepare them, but do not change a tokenized row
NOT_IN_KEY = {"train", "validation", "test", "split", "seed", "balance", "mix_by", "streaming", "shuffle_buffer",
              "cache_dir", "num_proc", "prepare"}  # fmt: skip
TOKENIZER_FILES = ("token", "vocab", "merges", "spiece", "special", "added_tokens", "chat_template", "sentencepiece")


def cache_root(recipe: Recipe) -> Path:
    """data.cache_dir, else $LAUNCHER_CACHE_DIR, else ~/.cache/launcher; entries live in its tokenized/."""
    base = recipe.data.cache_dir or os.environ.get("LAUNCHER_CACHE_DIR") or Path.home() / ".cache" / "launcher"
    return Path(base).expanduser().resolve() / "tokenized"


def tokenizer_fingerprint(recipe: Recipe) -> str:
    """The tokenizer's identity without loading it: the model path and revision, and for a local folder the
    bytes of its tokenizer files (vocabulary, merges, config, chat template)."""
    path = resolve_model_path(recipe.model.path)
    fingerprint = Fingerprint(path, str(recipe.model.revision))
    folder = Path(path)
    if folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.is_file() and any(part in file.name.lower() for part in TOKENIZER_FILES):
                fingerprint.add(file.name)
                fingerprint.update(file.read_bytes())
    return fingerprint.hexdigest()


def settings(recipe: Recipe) -> dict:
    """What changes a tokenized row besides the source and the tokenizer."""
    task = recipe.task.model_dump(mode="json", exclude={"loss", "metrics"})
    data = recipe.data.model_dump(mode="json", exclude=NOT_IN_KEY)
    found = {"task": task, "data": data, "hooks": recipe.task.spec.rank_hooks}
    if recipe.task.spec.renders_chats:  # the recipe's template file by content, not by name
        from launcher.planning.conversations import RowProblem, recipe_template

        try:
            found["template"] = recipe_template(recipe)
        except RowProblem:  # unreadable: the row checks name it, and nothing is keyed with it
            found["template"] = None
    return found


class CheckMemo:
    """What the checks found in a source of local files, remembered beside the cache under the files' identity
    (path, size, modification time in ns, inode) and the settings the checks use, so that launching again on
    files that did not change does not read them again (the ranks never read them at all). A source with a
    remote file (a URL) is always read. The memo holds counts and the fingerprint, never rows."""

    def __init__(self, recipe: Recipe, resolved, rows_check=None):
        self.path = None
        # conversations and pairs: what the row checks rendered with (no tokenizer here: structure only)
        rendering = [tokenizer_fingerprint(recipe), rows_check.encoder is not None] if rows_check else None
        stats = []
        for file in resolved.files:
            if is_url(file.location):
                return
            try:
                st = os.stat(file.location)
            except OSError:
                return
            stats.append([file.location, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
        text = json.dumps([CACHE_VERSION, settings(recipe), resolved.config.label, resolved.role, stats, rendering])
        self.path = cache_root(recipe) / "checked" / f"{Fingerprint(text).hexdigest()[:24]}.json"

    def get(self) -> tuple[int, int, str] | None:
        if self.path is None:
            return None
        try:
            found = json.loads(self.path.read_text())
            return int(found["rows"]), int(found["dropped"]), str(found["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, rows: int, dropped: int, fingerprint: str) -> None:
        if self.path is None:
            return
        try:  # best effort: an unwritable cache folder only costs reading the files again next time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"rows": rows, "dropped": dropped, "fingerprint": fingerprint}))
            os.replace(tmp, self.path)
        except OSError:
            pass


def carves(recipe: Recipe) -> bool:
    """The training sources are carved into validation/test parts (a split without a source of its own)."""
    return any(getattr(recipe.data, s) is None and getattr(recipe.data.split, s) > 0 for s in ("validation", "test"))


def entry_key(recipe: Recipe, check: SourceCheck, tokenizer: str) -> str:
    parts = [CACHE_VERSION, tokenizer, json.dumps(settings(recipe), sort_keys=True), check.fingerprint, check.split]
    if check.split == "train" and carves(recipe):
        parts.append(json.dumps([recipe.data.split.model_dump(), recipe.data.seed, check.index]))
    return Fingerprint(*parts).hexdigest()[:24]


class SourcePlan(BaseModel):
    """One source as the plan shows it and the ranks open it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: str
    index: int
    label: str
    rows: int  # clean rows (a training source: before the carve)
    train_rows: int  # rows it gives the training split (after the carve)
    dropped: int
    weight: float | None
    key: str  # its cache entry (empty for a streamed training source)
    samples_per_epoch: int | None  # None: by tokens, known once tokenized
    tokens: int | None  # training tokens, once tokenized
    cached: bool  # its entry was complete when the launcher planned


class DataPlan(BaseModel):
    """The data part of the plan: the cache folder and every source, in the recipe's order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_dir: str
    mix_by: str
    streaming: bool
    sources: list[SourcePlan]

    def of(self, split: str) -> list[SourcePlan]:
        return [s for s in self.sources if s.split == split]

    @property
    def ready(self) -> bool:
        return all(s.cached for s in self.sources if s.key)

    def rows(self) -> list[tuple[str, str]]:
        """The plan table's lines for the data."""
        lines = []
        train = self.of("train")
        total = sum(s.samples_per_epoch or 0 for s in train)
        for s in self.sources:
            if s.split != "train":
                what = f"{s.rows:,} rows"
            elif self.streaming:
                weight = f", weight {s.weight:g}" if s.weight is not None else ""
                what = f"streamed (first rows checked){weight}"
            else:
                what = f"{s.rows:,} rows" + (f", {s.train_rows:,} for training" if s.train_rows != s.rows else "")
                if len(train) > 1 or s.weight is not None:
                    if s.samples_per_epoch is None:
                        what += f", weight {s.weight:g} of the tokens: samples per epoch set once tokenized"
                    else:
                        share = s.samples_per_epoch / total if total else 0.0
                        by = f" by {self.mix_by}" if s.weight is not None else ""
                        what += (
                            f", {s.samples_per_epoch:,} samples per epoch ({share:.1%}{by}, "
                            f"{s.samples_per_epoch / max(s.train_rows, 1):.2f}× its rows)"
                        )
            if s.dropped:
                what += f", {s.dropped:,} dropped"
            lines.append((f"data: {s.split}", f"{shown(s.label)}: {what}"))
        state = "streamed by the ranks" if self.streaming and not self.sources[1:] else None
        cached = [s for s in self.sources if s.key]
        if cached:
            ready = sum(s.cached for s in cached)
            state = (
                "ready in the cache"
                if ready == len(cached)
                else f"{len(cached) - ready} of {len(cached)} source(s) to tokenize before the ranks start"
            )
        lines.append(("tokenized cache", f"{state} ({self.cache_dir})"))
        return lines


def shown(label: str) -> str:
    """A source's label for the plan table: a path under the current folder relative to it."""
    try:
        return str(Path(label).relative_to(Path.cwd()))
    except ValueError:
        return label


def manifest(folder: Path) -> dict | None:
    """A complete entry's manifest, or None."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def make_data_plan(recipe: Recipe, summary: DataSummary) -> DataPlan:
    """Keys, readiness and per-epoch shares of every source (by tokens when their entries hold the counts)."""
    from launcher.planning.data_files import carve_counts

    root = cache_root(recipe)
    tokenizer = tokenizer_fingerprint(recipe)
    entries = []
    for check in summary.sources:
        streamed = summary.streaming and check.split == "train"
        key = "" if streamed else entry_key(recipe, check, tokenizer)
        found = manifest(root / key) if key else None
        train_rows = carve_counts(check.rows, recipe)["train"] if check.split == "train" else check.rows
        tokens = found["parts"]["train"]["tokens"] if found and check.split == "train" else None
        entries.append((check, key, found is not None, train_rows, tokens))
    train = [e for e in entries if e[0].split == "train"]
    weights = [e[0].weight for e in train] if recipe.data.weighted else None
    token_counts = [e[4] for e in train]
    per_epoch = samples_per_epoch(
        [e[3] for e in train], weights, recipe.data.mix_by, None if None in token_counts else token_counts
    )
    sources, i = [], 0
    for check, key, ready, train_rows, tokens in entries:
        k = None
        if check.split == "train":
            k = per_epoch[i] if per_epoch is not None and not summary.streaming else None
            i += 1
        sources.append(
            SourcePlan(
                split=check.split,
                index=check.index,
                label=check.label,
                rows=check.rows,
                train_rows=train_rows,
                dropped=check.dropped,
                weight=check.weight,
                key=key,
                samples_per_epoch=k,
                tokens=tokens,
                cached=ready,
            )  # fmt: skip
        )
    return DataPlan(cache_dir=str(root), mix_by=recipe.data.mix_by, streaming=summary.streaming, sources=sources)
