"""File formats → batches of raw rows, read sequentially in bounded memory, hashed on the way.

One reader per file suffix (READERS): JSON Lines and JSON arrays, CSV/TSV, parquet, and the arrow files that
datasets writes. Each yields (rows, number of the first row) a batch at a time, so the launcher's checks and
the cache's tokenization hold one batch, whatever the size of the file. The bytes pass through an xxh3-128
digest (`Fingerprint`) as they are read: with the files' names and sizes it is a source's identity in the
tokenized cache, and no row is ever serialized again to key it. A reader raises SourceError (a ValueError)
with the reason as the user should read it. No torch; pandas and pyarrow are imported by their readers only.
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from launcher.config.recipe import Recipe, is_url

BATCH_ROWS = 4096  # rows per batch: a few MB of Python objects for typical rows
CHUNK_BYTES = 8 << 20  # bytes read at a time from a text file
COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}


class SourceError(ValueError):
    """A source that cannot be read, with the reason as the user should read it."""


class Fingerprint:
    """A running xxh3-128 digest over what identifies a source: names, sizes and the bytes themselves."""

    def __init__(self, *parts: str):
        import xxhash

        self._digest = xxhash.xxh3_128()
        for part in parts:
            self.add(part)

    def add(self, text: str) -> None:
        self._digest.update(text.encode() + b"\0")

    def update(self, data: bytes) -> None:
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _Hashing(io.RawIOBase):
    """A binary stream that feeds every byte read through it to a Fingerprint (sequential readers only)."""

    def __init__(self, raw, fingerprint: Fingerprint | None):
        self.raw, self.fingerprint = raw, fingerprint

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        if self.fingerprint is not None:
            self.fingerprint.update(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.raw.close()
        super().close()


@dataclass
class DataFile:
    """One file of a source: how messages name it, where it is, its size, and which reader reads it."""

    name: str
    location: str  # a local path or an fsspec URL
    size: int | None
    suffix: str  # READERS key, compression suffix removed
    compression: str | None = None

    def raw(self):
        """The file's bytes as they are stored (seekable: parquet reads its footer first)."""
        if is_url(self.location):
            import fsspec

            return fsspec.open(self.location, "rb").open()
        return open(self.location, "rb")  # noqa: SIM115 - closed by the caller

    def open(self, fingerprint: Fingerprint | None):
        """The file's uncompressed bytes as a sequential stream; the raw bytes go through `fingerprint`."""
        stream = io.BufferedReader(_Hashing(self.raw(), fingerprint), CHUNK_BYTES)
        if self.compression:
            from fsspec.compression import compr

            return io.BufferedReader(compr[self.compression](stream, mode="rb"), CHUNK_BYTES)
        return stream

    def hash_into(self, fingerprint: Fingerprint) -> None:
        """All the stored bytes through `fingerprint` (for the formats read out of order)."""
        with self.raw() as f:
            while chunk := f.read(CHUNK_BYTES):
                fingerprint.update(chunk)


# ----------------------------------------------------------------------------- readers
def _json_rows(text: str, name: str, line: int, decoder: json.JSONDecoder) -> dict:
    try:
        row = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{name}: line {line} is not valid JSON ({exc.msg})") from None
    except _DuplicateKey as exc:
        raise SourceError(f"{name}: line {line} has the key {exc.key!r} twice; keys (columns) must be unique") from None
    return row


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple]) -> dict:
    """json's object hook: refuse an object that names a key twice (json.loads would keep the last silently)."""
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return row


def read_json(stream, name: str, recipe: Recipe) -> Iterator[tuple[list, int]]:
    """JSON Lines, or one JSON array of objects. Lines split on \\n only: U+2028 and U+0085 inside a string are
    text (str.splitlines would cut the string there)."""
    decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)
    if stream.peek(64)[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        yield from _json_array(stream, name, decoder)
        return
    utf8 = codecs.getincrementaldecoder("utf-8")()
    rows, record, line, tail = [], 0, 0, ""
    while True:
        chunk = stream.read(CHUNK_BYTES)
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise SourceError(f"{name} is not UTF-8 text") from None
        lines = (tail + text).split("\n")
        tail = lines.pop() if chunk else ""
        for text in lines:
            line += 1
            if line == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            record += 1
            row = _json_rows(text, name, line, decoder)
            if not isinstance(row, dict):
                raise SourceError(f"{name}: record {record} is {type(row).__name__}, expected an object")
            rows.append(row)
            if len(rows) == BATCH_ROWS:
                yield rows, record - len(rows) + 1
                rows = []
        if not chunk:
            break
    if rows:
        yield rows, record - len(rows) + 1


MAX_OBJECT_CHARS = 64 << 20  # one object of a JSON array may span this much before a parse error is final


def _json_array(stream, name: str, decoder: json.JSONDecoder) -> Iterator[tuple[list, int]]:
    """The objects of a top-level JSON array, decoded one by one from a sliding buffer (bounded memory)."""
    utf8 = codecs.getincrementaldecoder("utf-8")()

    def more() -> str:
        try:
            data = stream.read(CHUNK_BYTES)
            return utf8.decode(data, final=not data)
        except UnicodeDecodeError:
            raise SourceError(f"{name} is not UTF-8 text") from None

    text = more().lstrip("\ufeff \t\r\n")[1:]  # after the opening [
    line, rows, record = 1, [], 0
    while True:
        if len(text) < CHUNK_BYTES:
            text += more()
        stripped = text.lstrip(" \t\r\n,")
        line += text[: len(text) - len(stripped)].count("\n")
        text = stripped
        if text.startswith("]") or not text:
            break
        try:
            row, end = decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            extra = more() if len(text) < MAX_OBJECT_CHARS else ""
            if extra:  # an object cut by the end of the buffer: read on
                text += extra
                continue
            raise SourceError(f"{name}: invalid JSON at line {line + exc.lineno - 1}: {exc.msg}") from None
        except _DuplicateKey as exc:
            raise SourceError(f"{name}: record {record + 1} has the key {exc.key!r} twice") from None
        record += 1
        if not isinstance(row, dict):
            raise SourceError(f"{name}: record {record} is {type(row).__name__}, expected an object")
        rows.append(row)
        line += text[:end].count("\n")
        text = text[end:]
        if len(rows) == BATCH_ROWS:
            yield rows, record - len(rows) + 1
            rows = []
    if rows:
        yield rows, record - len(rows) + 1


def read_csv(stream, name: str, recipe: Recipe, delimiter: str) -> Iterator[tuple[list, int]]:
    """CSV/TSV in chunks; the header row is read as data, so that a column named twice is seen (pandas would
    rename the second one)."""
    import pandas as pd

    data = recipe.data
    delimiter = data.csv_delimiter or delimiter
    header = None if data.csv_header else data.csv_columns
    try:
        chunks = pd.read_csv(
            stream,
            encoding="utf-8",
            sep=delimiter,
            dtype=str,
            keep_default_na=False,
            header=None,
            quoting=3 if delimiter == "\t" else 0,
            chunksize=BATCH_ROWS,
        )
        record = 0
        for chunk in chunks:
            values = chunk.values.tolist()
            if header is None and data.csv_header:
                header = [str(v) for v in values.pop(0)]
                _unique_columns(header, name, "the header names")
            names = header if header is not None else list(range(chunk.shape[1]))
            if len(names) < chunk.shape[1]:
                raise SourceError(f"cannot read {name} as CSV: {chunk.shape[1]} fields but {len(names)} column names")
            if values:
                yield [dict(zip(names, v)) for v in values], record + 1
                record += len(values)
    except pd.errors.EmptyDataError:
        return
    except (UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise SourceError(f"cannot read {name} as CSV: {str(exc).splitlines()[0]}") from None


def read_parquet(stream, name: str, recipe: Recipe) -> Iterator[tuple[list, int]]:
    """Parquet by row groups; `stream` is seekable (the footer is read first)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(stream)
        _unique_columns(parquet.schema_arrow.names, name)
        record = 0
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            yield batch.to_pylist(), record + 1
            record += batch.num_rows
    except SourceError:
        raise
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise SourceError(f"cannot read {name} as parquet: {exc}") from None


def read_arrow(path: str, name: str) -> Iterator[tuple[list, int]]:
    """One arrow file of a saved or Hub dataset (datasets writes the IPC stream format), memory-mapped."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
        _unique_columns(reader.schema.names, name)
        record = 0
        for batch in reader:
            for start in range(0, batch.num_rows, BATCH_ROWS):
                part = batch.slice(start, BATCH_ROWS)
                yield part.to_pylist(), record + 1
                record += part.num_rows
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot read {name} as an arrow file of a saved dataset: {exc}") from None


def _unique_columns(names: list, name: str, where: str = "the schema names") -> None:
    seen: set = set()
    twice = next((c for c in names if c in seen or seen.add(c)), None)
    if twice is not None:
        raise SourceError(f"{name}: {where} the column {twice!r} twice; columns must be unique")


Reader = Callable[..., Iterator[tuple[list, int]]]
# suffix → reader(stream, name, recipe); a new file format is an entry here (docs/extending.md)
READERS: dict[str, Reader] = {
    ".jsonl": read_json,
    ".json": read_json,
    ".csv": lambda stream, name, recipe: read_csv(stream, name, recipe, ","),
    ".tsv": lambda stream, name, recipe: read_csv(stream, name, recipe, "\t"),
    ".parquet": read_parquet,
}
OUT_OF_ORDER = {".parquet"}  # readers that seek: hashed in a pass of their own, then read from a seekable file
DESCRIBED = (
    ".jsonl .json .csv .tsv .parquet (optionally .gz .bz2 .xz .zst), a folder of them or written by datasets' "
    "save_to_disk, a glob, an fsspec URL, or hub:NAME"
)


def suffix_of(name: str) -> tuple[str, str | None]:
    """The reader suffix and the compression of a file name: data.jsonl.gz → (.jsonl, gzip)."""
    lower = name.lower()
    for ext, compression in COMPRESSION.items():
        if lower.endswith(ext):
            return Path(lower[: -len(ext)]).suffix, compression
    return Path(lower).suffix, None


def data_file(name: str, location: str, size: int | None) -> DataFile:
    suffix, compression = suffix_of(name)
    if suffix not in READERS:
        raise SourceError(f"unsupported file type {suffix!r} for {name}; readers: {DESCRIBED}")
    return DataFile(name, location, size, suffix, compression)
