"""Recipe files → a validated Recipe, or every problem at once.

YAML is only ever read with the safe loader. Each problem names the field
path, the YAML line (or the override that set it), the value given, what is
valid, and the nearest valid key for a typo, so a user fixes a recipe in one
edit instead of one launch per mistake.
"""

from __future__ import annotations

import difflib
import glob
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from launcher.config.recipe import Recipe
from launcher.errors import Problem, RecipeError, UsageError, UserError

# Input paths travel with the recipe (relative to its folder); outputs land where you run.
INPUT_PATHS = [
    ("model", "path"),
    ("model", "adapter"),
    ("train", "resume"),
    ("distributed", "deepspeed_config"),
    ("task", "chat_template_file"),
]
DATA_SOURCES = ("train", "validation", "test")  # data sources: a path, a {path: ...} mapping, or a list of them
MAX_YAML_BYTES = 1_000_000


@dataclass
class Source:
    """Where each value came from, for error messages."""

    name: str
    lines: dict[tuple, int] = field(default_factory=dict)
    overrides: dict[tuple, str] = field(default_factory=dict)

    def where(self, loc: tuple) -> str:
        for n in range(len(loc), 0, -1):
            key = tuple(loc[:n])
            if key in self.overrides:
                return f"override {self.overrides[key]}"
            if key in self.lines:
                return f"line {self.lines[key]}"
        return ""


def _line_map(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = prefix + (key_node.value,)
            lines[key] = key_node.start_mark.line + 1
            lines.update(_line_map(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[prefix + (i,)] = item.start_mark.line + 1
            lines.update(_line_map(item, prefix + (i,)))
    return lines


def read_yaml(path: Path, what: str = "recipe", error: type[UserError] = RecipeError) -> tuple[dict, dict[tuple, int]]:
    """Safe-load a YAML mapping with the line of every key.

    Hostile input is refused before it can cost time or memory: only a regular file is opened (a FIFO
    would block), at most MAX_YAML_BYTES are read, and anchors may not expand the document beyond
    MAX_YAML_NODES nodes (a "billion laughs" file is a few hundred bytes that expands exponentially)."""
    name = str(path)
    if not path.exists():
        raise error(name, [Problem("", f"{what} file not found")])
    if path.is_dir():
        raise error(name, [Problem("", f"{what} path is a folder, not a YAML file")])
    if not path.is_file():
        raise error(name, [Problem("", f"{what} path is not a regular file (a pipe or device?); give a YAML file")])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise error(name, [Problem("", f"{what} file cannot be read: {exc.strerror}")]) from None
    if len(raw) > MAX_YAML_BYTES:
        raise error(name, [Problem("", f"{what} file is over {MAX_YAML_BYTES} bytes; recipes are small text files")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(name, [Problem("", f"{what} file is not UTF-8 text (binary file?)")]) from None
    if "\x00" in text:
        raise error(name, [Problem("", f"{what} file holds NUL bytes (binary file?)")])
    try:
        node, data = _safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(name, [Problem("", f"not valid YAML: {problem}", where)]) from None
    except ValueError as exc:  # e.g. an integer of thousands of digits (Python's int() limit)
        raise error(name, [Problem("", f"value out of range: {str(exc).splitlines()[0]}")]) from None
    except RecursionError:
        raise error(name, [Problem("", "not valid YAML: nested too deeply")]) from None
    if data is None:
        raise error(name, [Problem("", f"{what} file is empty")])
    if not isinstance(data, dict):
        raise error(name, [Problem("", f"{what} must be a YAML mapping of sections, got {type(data).__name__}")])
    return data, _line_map(node)


MAX_YAML_NODES = 100_000


def _safe_load(text: str) -> tuple[yaml.Node | None, Any]:
    """Compose once with the safe loader, bound the expanded size, then construct from the same nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"anchors and aliases expand to over {MAX_YAML_NODES} nodes (a 'billion laughs' "
                "document?); write the values out"
            )
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document would have with every alias copied out; shared nodes are counted once per use."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a recursive alias never ends
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def parse_override(text: str) -> tuple[tuple, Any]:
    if "=" not in text:
        raise UsageError("command line", [Problem(text, "an override is key.sub=value (e.g. train.optimizer.lr=1e-5)")])
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UsageError("command line", [Problem(key, f"malformed override key in {text!r}")])
    try:
        parsed = _safe_load(value)[1] if value != "" else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        parsed = value
    return tuple(key.split(".")), parsed


def _set(data: dict, loc: tuple, value: Any) -> None:
    node = data
    for part in loc[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[loc[-1]] = value


def _resolve_inputs(data: dict, base: Path, cwd: Path, overridden: set[tuple]) -> None:
    for loc in INPUT_PATHS:
        node = data
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(loc[-1]), str):
            continue
        value = node[loc[-1]]
        if loc == ("train", "resume") and value in ("auto", "never"):
            continue
        if value.startswith("pkg:") or Path(value).is_absolute():
            continue
        candidate = (cwd if loc in overridden else base) / value
        # A model path that is no local folder is a hub id and stays as written.
        if loc == ("model", "path") and not candidate.exists():
            continue
        node[loc[-1]] = str(candidate.resolve())
    section = data.get("data")
    for split in DATA_SOURCES if isinstance(section, dict) else ():
        root = cwd if any(loc[:2] == ("data", split) for loc in overridden) else base
        value = section.get(split)
        if isinstance(value, list):
            section[split] = [_resolved_item(item, root) for item in value]
        elif value is not None:
            section[split] = _resolved_item(value, root)


def _resolved_item(item: Any, root: Path) -> Any:
    """One data source as written (a path, or a mapping with `path`), its path resolved."""
    if isinstance(item, str):
        return _resolved_source(item, root)
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return {**item, "path": _resolved_source(item["path"], root)}
    return item


def _resolved_source(path: str, root: Path) -> str:
    """A data source path relative to `root` made absolute; URLs and hub names stay as written (a hub: name that
    is a local folder, a clone of a dataset repository, is resolved like a path)."""
    from launcher.config.recipe import HUB_PREFIX, is_url

    if is_url(path):
        return path
    if path.startswith(HUB_PREFIX):
        name = path[len(HUB_PREFIX) :]
        local = root / name
        return HUB_PREFIX + str(local.resolve()) if not Path(name).is_absolute() and local.is_dir() else path
    return path if Path(path).is_absolute() else str((root / path).resolve())


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Valid keys of the section at loc (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _data_path(data: Any, loc: tuple) -> tuple:
    """Map a pydantic error location onto keys that exist in the YAML (drops union tags)."""
    path: list = []
    node = data
    for i, part in enumerate(loc):
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            path.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(part, str):
            path.append(part)
        # else: a discriminator tag or function-validator frame; skip it
    return tuple(path)


def _problem(err: dict, data: dict, source: Source, schema: type[BaseModel] = Recipe) -> Problem:
    loc = _data_path(data, tuple(err["loc"]))
    dotted = ".".join(str(p) for p in loc)
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        valid = _fields_at(schema, tuple(p for p in loc[:-1] if isinstance(p, str))) or []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        msg = f"unknown key{hint} Valid keys here: {', '.join(valid)}"
    elif kind == "missing":
        msg = "required field is missing"
    elif kind == "union_tag_invalid" or kind == "union_tag_not_found":
        msg = err["msg"]
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if given is not None and not isinstance(given, (dict, list)):
            msg += f" (given: {given!r})"
        field, sep, rest = msg.partition(": ")
        if sep and isinstance(given, dict) and field in given:  # a section's check naming one of its keys
            loc, msg = (*loc, field), rest
            dotted = ".".join(str(p) for p in loc)
    return Problem(dotted, msg, source.where(loc))


def load_recipe(path: str | Path, overrides: list[str] | None = None, cwd: Path | None = None) -> Recipe:
    """Read, override, resolve paths and validate. Raises RecipeError listing every problem."""
    path = Path(path)
    data, lines = read_yaml(path)
    source = Source(str(path), lines)
    parsed = [parse_override(o) for o in overrides or []]
    for loc, value in parsed:
        _set(data, loc, value)
        source.overrides[loc] = f"{'.'.join(loc)}={value!r}"
    _resolve_inputs(data, path.resolve().parent, (cwd or Path.cwd()), {loc for loc, _ in parsed})
    _resolve_output(data, cwd or Path.cwd())
    return validate(Recipe, data, source, extra=_missing_inputs)


def _resolve_output(data: dict, cwd: Path) -> None:
    """output_dir is relative to where `launch` runs, on every backend: made absolute here, once, so that no
    rank resolves it against its own working directory (a Ray worker's is Ray's session folder). Symlinks are
    kept as written (os.path.abspath, not resolve)."""
    value = data.get("output_dir")
    if isinstance(value, str) and value and not Path(value).is_absolute():
        data["output_dir"] = os.path.abspath(cwd / value)


def validate(schema: type[BaseModel], data: dict, source: Source, extra=None, error: type[UserError] = RecipeError):
    """schema.model_validate, with every problem rendered for a user (plus extra(data, source) ones)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(e, data, source, schema) for e in exc.errors(include_url=False)]
        problems += extra(data, source) if extra else []
        raise error(source.name, problems) from None


def _missing_inputs(data: dict, source: Source) -> list[Problem]:
    """Local data files that do not exist, reported beside schema errors so one edit fixes everything (a glob,
    a URL or a hub: name is looked up by the data checks)."""
    from launcher.config.recipe import HUB_PREFIX, is_url

    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    problems = []
    for split in DATA_SOURCES:
        value = section.get(split)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            path = item.get("path") if isinstance(item, dict) else item
            if not isinstance(path, str) or is_url(path) or path.startswith(HUB_PREFIX) or glob.has_magic(path):
                continue
            if not Path(path).exists():
                loc = ("data", split) + ((i,) if isinstance(value, list) else ())
                name = f"data.{split}" + (f".{i}" if isinstance(value, list) else "")
                problems.append(Problem(name, f"file not found: {path}", source.where(loc)))
    return problems


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def resolve_model_path(path: str) -> str:
    """A local folder, a hub id (returned unchanged), or pkg:PACKAGE/SUB → the folder inside the package."""
    if not path.startswith("pkg:"):
        return path
    package, _, sub = path[len("pkg:") :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            "model",
            [Problem("model.path", f"package {package!r} is not installed; pip install {package.replace('_', '-')}")],
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise RecipeError("model", [Problem("model.path", f"package {package!r} has no folder {sub!r} ({folder})")])
    return str(folder)
