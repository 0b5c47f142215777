"""Data sources → their files, found: a local file, a folder (of data files, or written by datasets'
save_to_disk), a glob, an fsspec URL (s3://, gs://, https://, file://) or a Hugging Face Hub dataset.

`resolve` finds what a source (config.recipe.SourceConfig) names; `ResolvedSource.batches` streams its rows
through the readers of launcher.planning.readers, file after file, with the bytes hashed on the way.
Credentials for URLs come from the environment (fsspec's and the cloud SDKs' own variables); nothing here
writes them anywhere. No torch; fsspec and datasets are imported only by the sources that need them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from launcher.config.recipe import HUB_PREFIX, Recipe, SourceConfig, is_url
from launcher.planning.readers import (
    BATCH_ROWS,
    DESCRIBED,
    OUT_OF_ORDER,
    READERS,
    DataFile,
    Fingerprint,
    SourceError,
    data_file,
    read_arrow,
    suffix_of,
)

SAVED_MARKERS = ("state.json", "dataset_info.json")  # a folder written by datasets' save_to_disk


@dataclass
class Batch:
    """Raw rows of one file, as read: `first` is the row number (1-based, in that file) of rows[0]."""

    rows: list[dict]
    file: str
    first: int


@dataclass
class ResolvedSource:
    """A source's files (or its Hub dataset), found: what the checks stream and the cache reads again."""

    config: SourceConfig
    role: str  # train, validation or test: a Hub source's default split
    files: list[DataFile] = field(default_factory=list)
    arrow: bool = False  # the files are arrow files of a saved or Hub dataset
    hub_stream: object | None = None  # data.streaming on a Hub source: datasets' IterableDataset

    def identity(self) -> list[str]:
        """What names this source's content besides its bytes: the source as written, and each file's name
        and size (a file renamed or appended to is another source)."""
        return [self.config.label, *(f"{f.name}:{f.size}" for f in self.files)]

    def batches(self, recipe: Recipe, fingerprint: Fingerprint | None = None) -> Iterator[Batch]:
        """Every row, file after file, in batches; the bytes read go through `fingerprint`."""
        if self.hub_stream is not None:
            yield from _iterable_batches(self.hub_stream, self.config.label)
            return
        for file in self.files:
            if fingerprint is not None:
                fingerprint.add(f"{file.name}:{file.size}")
            try:
                if self.arrow or file.suffix in OUT_OF_ORDER:
                    if fingerprint is not None:
                        file.hash_into(fingerprint)
                    if self.arrow:
                        for rows, first in read_arrow(file.location, file.name):
                            yield Batch(rows, file.name, first)
                        continue
                    with file.raw() as raw:
                        for rows, first in READERS[file.suffix](raw, file.name, recipe):
                            yield Batch(rows, file.name, first)
                    continue
                with file.open(fingerprint) as stream:
                    for rows, first in READERS[file.suffix](stream, file.name, recipe):
                        yield Batch(rows, file.name, first)
            except (OSError, EOFError) as exc:  # unreadable, a truncated archive, a dropped connection
                raise SourceError(f"cannot read {file.name}: {exc}") from None


def _iterable_batches(dataset, label: str) -> Iterator[Batch]:
    record = 0
    for columns in dataset.iter(batch_size=BATCH_ROWS):
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        yield Batch(rows, label, record + 1)
        record += len(rows)


def resolve(config: SourceConfig, role: str, streaming: bool = False) -> ResolvedSource:
    """Find a source's files; SourceError when there is nothing readable there."""
    if config.is_hub:
        return _hub(config, role, streaming)
    if is_url(config.path):
        return ResolvedSource(config, role, _url_files(config.path))
    path = config.path
    if glob.has_magic(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not found:
            raise SourceError(f"no file matches {path}")
        return ResolvedSource(config, role, [_local_file(Path(p)) for p in found])
    folder = Path(path)
    if not folder.exists():
        raise SourceError(f"file not found: {path}")
    if folder.is_dir():
        return _local_folder(config, role, folder)
    return ResolvedSource(config, role, [_local_file(folder)])


def _local_file(path: Path) -> DataFile:
    if not path.is_file():  # a FIFO or a device would block the reader, or never end
        raise SourceError(f"{path} is not a regular file (a pipe or device?); readers: {DESCRIBED}")
    if not os.access(path, os.R_OK):
        raise SourceError(f"{path} is not readable by this user (permissions)")
    return data_file(str(path), str(path), path.stat().st_size)


def _local_folder(config: SourceConfig, role: str, folder: Path) -> ResolvedSource:
    if (folder / "dataset_dict.json").exists():
        names = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise SourceError(f"{folder} holds several splits ({', '.join(names)}); point to one split's folder")
    if any((folder / marker).exists() for marker in SAVED_MARKERS):
        return _saved(config, role, folder)
    found = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    readable = [p for p in found if suffix_of(p.name)[0] in READERS]
    if not readable:
        raise SourceError(
            f"{folder} is a folder but not a saved HF dataset (no dataset_info.json) and holds no data files; "
            f"readers: {DESCRIBED}"
        )
    return ResolvedSource(config, role, [_local_file(p) for p in readable])


def _saved(config: SourceConfig, role: str, folder: Path) -> ResolvedSource:
    try:
        state = json.loads((folder / "state.json").read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise SourceError(f"{folder} looks like a saved dataset but its state.json is unreadable") from None
    files = [DataFile(str(folder / n), str(folder / n), (folder / n).stat().st_size, ".arrow") for n in names]
    return ResolvedSource(config, role, files, arrow=True)


def _url_files(url: str) -> list[DataFile]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        protocol = url.split("://", 1)[0]
        paths = sorted(fs.glob(path)) if glob.has_magic(path) else [path]
        if not paths:
            raise SourceError(f"no file matches {url}")
        files = []
        for found in paths:
            info = fs.info(found)
            if info.get("type") == "directory":
                inside = sorted(p for p in fs.find(found) if suffix_of(p)[0] in READERS)
                if not inside:
                    raise SourceError(f"{url} is a folder with no data files; readers: {DESCRIBED}")
                files += [_url_file(fs, protocol, p) for p in inside]
            else:
                files.append(_url_file(fs, protocol, found, info))
        return files
    except SourceError:
        raise
    except ImportError as exc:
        raise SourceError(f"{url}: the {exc.name or 'filesystem'} package is needed to read this URL") from None
    except FileNotFoundError:
        raise SourceError(f"file not found: {url}") from None
    except Exception as exc:  # the cloud SDKs raise their own types (no credentials, access denied, no bucket)
        first = str(exc).strip().splitlines()
        raise SourceError(f"cannot read {url}: {type(exc).__name__}: {first[0] if first else ''}") from None


def _url_file(fs, protocol: str, path: str, info: dict | None = None) -> DataFile:
    info = info or fs.info(path)
    location = path if "://" in path else f"{protocol}://{path}"
    return data_file(location, location, info.get("size"))


def _hub(config: SourceConfig, role: str, streaming: bool) -> ResolvedSource:
    """A Hub dataset through datasets.load_dataset (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: the local cache
    only); a local folder after hub: is a clone of a dataset repository (its README's configs are the subsets)."""
    import datasets

    name = config.path[len(HUB_PREFIX) :]
    split = config.split or role
    try:
        loaded = datasets.load_dataset(name, config.subset, split=split, revision=config.revision, streaming=streaming)
    except Exception as exc:  # datasets raises many types: not found, offline and not cached, unknown split/config
        text = str(exc).strip().splitlines()
        raise SourceError(f"{config.label}: {type(exc).__name__}: {text[0] if text else ''}") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise SourceError(f"{config.label} holds several splits ({', '.join(loaded)}); set split")
    if streaming:
        return ResolvedSource(config, role, hub_stream=loaded)
    files = [
        DataFile(
            f"{config.label} [{Path(f['filename']).name}]", f["filename"], os.path.getsize(f["filename"]), ".arrow"
        )
        for f in loaded.cache_files
    ]
    return ResolvedSource(config, role, files, arrow=True)
