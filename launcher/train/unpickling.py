"""What a checkpoint's pickles may hold, checked without running them (the launcher, before any rank starts)
and enforced when they are loaded (every rank).

A pickle is a program: a global it names is imported and may be called (`__reduce__`), so a checkpoint file
from someone else could run any code on resume. Two layers keep that from happening:

- `unsafe_globals(folder)`: a static read of every pickle in a checkpoint (raw pickles, and the `*.pkl`
  members of every torch archive, several of which may be concatenated in one DCP `.distcp` file) with
  pickletools, which decodes opcodes and executes nothing. Every global a pickle names must be one of
  ALLOWED: what torch's own `weights_only` loader allows (tensors, storages, dtypes, sizes) plus the few state
  types of the libraries the ranks use (numpy's array for the RNG state, DeepSpeed's loss scaler, ZeRO stage
  and fragment address, DCP's metadata classes). Anything else refuses the checkpoint before launch (exit 2).
- `safe_loading()` on the ranks: every `torch.load` inside it runs with `weights_only=True`, whatever its
  caller asked for (Accelerate's custom states and DeepSpeed ask for False), with only the extra types above
  allow-listed; DCP's metadata, which torch reads with plain `pickle.load`, is read by `RestrictedUnpickler`.

State the launcher owns is not pickled at all: trainer_state.json, manifest.json (JSON), model weights as
safetensors; the learning-rate schedule is a function of the step and the recipe (train.components).
Torch-free at module level: the launcher imports this on the --dry-run path.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

# torch's weights_only families (torch._weights_only_unpickler._get_allowed_globals; tests check that every
# name these patterns admit is on torch's list)
_STEMS = "BFloat16|Bool|Byte|Char|Double|Float|Half|Int|Long|Short"
TORCH_FAMILIES = re.compile(
    rf"torch\.(cuda\.)?({_STEMS}|ComplexDouble|ComplexFloat|QInt32|QInt8|QUInt2x4|QUInt4x2|QUInt8)Storage"
    rf"|torch\.(cuda\.)?(sparse\.)?({_STEMS})Tensor"
    r"|torch\.(u?int[1-8]|u?int(16|32|64)|float(16|32|64)|float8_\w+|float4_\w+|bfloat16|complex(32|64|128)|bool"
    r"|bits\w+|q(u)?int\w+|per_\w+|Size|Tensor|device)"
    r"|torch\._utils\._rebuild_(tensor(_v2|_v3)?|parameter(_with_state)?|qtensor|sparse_tensor|nested_tensor"
    r"|meta_tensor_no_storage|wrapper_subclass|device_tensor_from_cpu_tensor|device_tensor_from_numpy)"
    r"|torch\._tensor\._rebuild_from_type_v2|torch\.serialization\._get_layout"
    r"|torch\.nn\.parameter\.Parameter|torch\.storage\.(Typed|Untyped)Storage"
)
# module → names: what torch itself allows beyond its own types, and the state types the ranks' libraries write
EXTRA = {
    "builtins": {"set", "bytearray", "complex"},
    "collections": {"OrderedDict", "Counter"},
    "_codecs": {"encode"},  # bytes in protocol-2 pickles (numpy's RNG state)
    "numpy": {"ndarray", "dtype"},
    "numpy._core.multiarray": {"_reconstruct"},
    "numpy.core.multiarray": {"_reconstruct"},  # numpy < 2
    "numpy.dtypes": {"UInt32DType"},
    "deepspeed.runtime.fp16.loss_scaler": {"LossScaler", "DynamicLossScaler"},
    "deepspeed.runtime.zero.config": {"ZeroStageEnum"},
    "deepspeed.utils.tensor_fragment": {"fragment_address"},
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"PosixPath", "PurePosixPath"},  # DCP records where it wrote
}
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


class UnsafePickle(Exception):
    """A pickle names a global outside ALLOWED (or cannot be read as one): it is never loaded."""


def allowed(module: str, name: str) -> bool:
    return name in EXTRA.get(module, ()) or bool(TORCH_FAMILIES.fullmatch(f"{module}.{name}"))


def globals_named(data: bytes) -> set[str]:
    """Every 'module.name' a pickle would import, read from its opcodes (nothing is executed). The stack is
    followed only as far as STACK_GLOBAL needs: its module and name are the two strings below it."""
    stack: list = []
    memo: dict = {}
    mark = object()
    found: set[str] = set()
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = arg.partition(" ")
                found.add(f"{module}.{attr}")
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise UnsafePickle("STACK_GLOBAL with a computed name")
                found.add(f"{module}.{attr}")
                stack.append(None)
                continue
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafePickle(f"the copyreg extension code {arg}")
            if name in STRING_OPS:
                stack.append(arg)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            else:
                _apply(op, stack, mark)
    except (ValueError, IndexError, KeyError) as exc:  # not decodable as a pickle
        raise UnsafePickle(f"it cannot be read as a pickle ({exc})") from None
    return found


def _apply(op, stack: list, mark) -> None:
    """An opcode's effect on the stack, by its declared stack_before/stack_after (values unknown: None)."""
    before = op.stack_before
    if pickletools.markobject in before:
        while stack and stack[-1] is not mark:
            stack.pop()
        if stack:
            stack.pop()
        before = [b for b in before if b not in (pickletools.markobject, pickletools.stackslice)]
    for _ in before:
        if stack:
            stack.pop()
    stack.extend(mark if a is pickletools.markobject else None for a in op.stack_after)


class _View(io.RawIOBase):
    """The first `end` bytes of a file, seekable: zipfile then finds the archive that ends there."""

    def __init__(self, f, end: int):
        self.f, self.end, self.pos = f, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.end + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.end - self.pos))
        self.f.seek(self.pos)
        data = self.f.read(count)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def pickles_in(path: Path):
    """(where, bytes) of every pickle in a file: the file itself when it is a raw pickle, else the `.pkl` members
    of each torch archive it holds, walked from the end (DCP concatenates one archive per item). Other files
    (safetensors, JSON, text) hold none."""
    with open(path, "rb") as f:
        head = f.read(1)
        if head == b"\x80":  # a protocol 2+ pickle (DCP's .metadata, a pickle.dump)
            f.seek(0)
            yield path.name, f.read()
            return
        end = os.path.getsize(path)
        while end > 0:
            try:
                archive = zipfile.ZipFile(_View(f, end))
            except (zipfile.BadZipFile, OSError, ValueError):
                return
            members = archive.infolist()
            for member in members:
                if member.filename.endswith(".pkl"):
                    yield f"{path.name}:{member.filename}", archive.read(member)
            start = min((m.header_offset for m in members), default=0)
            if not 0 < start < end:
                return
            end = start


def unsafe_globals(folder: Path) -> list[str]:
    """What in a checkpoint folder would run code when loaded: 'FILE names GLOBAL' for each pickle naming a
    global outside ALLOWED (or that cannot be read as a pickle). Symbolic links inside are followed: what a
    library loads through them is checked like the rest."""
    found = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            for where, data in pickles_in(path):
                try:
                    bad = sorted(g for g in globals_named(data) if not allowed(*g.rsplit(".", 1)))
                except UnsafePickle as exc:
                    bad = [str(exc)]
                found += [f"{path.relative_to(folder).parent / where} names {g}" for g in bad]
        except OSError as exc:
            found.append(f"{path.relative_to(folder)} cannot be read ({exc.strerror})")
    return found


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that imports only ALLOWED globals (Python's documented way to restrict unpickling)."""

    def find_class(self, module: str, name: str):
        if not allowed(module, name):
            raise pickle.UnpicklingError(f"{module}.{name} is not a state type a checkpoint may hold")
        return super().find_class(module, name)


def _extra_objects() -> list:
    """The EXTRA types as objects, for torch.serialization.safe_globals (the ones whose library is installed)."""
    import importlib

    objects = []
    for module, names in EXTRA.items():
        if module in ("builtins", "collections", "_codecs"):
            continue  # on torch's own list
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        objects += [getattr(loaded, name) for name in sorted(names) if hasattr(loaded, name)]
    return objects


@contextlib.contextmanager
def safe_loading():
    """Every torch.load in the block with weights_only=True (TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides callers
    that pass False) and only the EXTRA types allow-listed besides torch's own; DCP metadata restricted too."""
    import torch

    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_extra_objects()):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


def dcp_reader(path: Path):
    """A torch.distributed.checkpoint FileSystemReader whose metadata is read by RestrictedUnpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = RestrictedUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))
