"""A model's shape read from its files, without torch: the tensor shapes in its safetensors headers and the
sizes in its config.json.

What the dry run's memory estimate uses for a full fine-tune on CPU processes, where building the model on
the meta device (planning.memory.model_shape) would import torch and transformers and make every
`--dry-run` many times slower. A safetensors file starts with an 8-byte length and a JSON header naming
every tensor's dtype and shape, so the count is exact for what the folder holds; the task head the recipe
adds to a base checkpoint (a classifier of hidden × classes) is counted by that formula.
"""

from __future__ import annotations

import json
import math
import struct
from collections import defaultdict
from pathlib import Path

from launcher.planning.memory import ModelShape

MAX_HEADER_BYTES = 100 * 2**20  # a header is a JSON list of names and shapes; 100 MiB is far beyond any model's
HEAD_PREFIXES = ("classifier.", "score.", "lm_head.", "qa_outputs.")


def tensor_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Every tensor's shape in the folder's *.safetensors files (None: there are none, or one is unreadable)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > MAX_HEADER_BYTES:
                    return None
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return None
        shapes.update({name: entry["shape"] for name, entry in header.items() if name != "__metadata__"})
    return shapes


def model_folder(path: str, revision: str | None = None) -> Path | None:
    """The local folder of a model: the path itself, or a hub id's snapshot in the local Hugging Face cache
    (found without the network); None when it is in neither."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        config = try_to_load_from_cache(path, "config.json", revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(config).parent if isinstance(config, str) else None


def _first(config: dict, *names: str, default=None):
    return next((config[n] for n in names if isinstance(config.get(n), int)), default)


def folder_shape(folder: Path, recipe) -> ModelShape | None:
    """The full fine-tune's shape of a local model folder, or None when its files do not tell."""
    shapes = tensor_shapes(folder)
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    hidden = _first(config, "hidden_size", "d_model", "n_embd")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    if shapes is None or hidden is None or layers is None:
        return None
    if config.get("is_encoder_decoder"):
        layers += _first(config, "num_decoder_layers", default=0)
    per_module: dict[str, int] = defaultdict(int)
    for name, shape in shapes.items():
        per_module[name.rsplit(".", 1)[0]] += math.prod(shape)
    num_params = sum(per_module.values())
    if not recipe.task.spec.language_model and not any(name.startswith(HEAD_PREFIXES) for name in shapes):
        classes = recipe.task.resolved_num_labels
        head = hidden * classes + classes  # the new head: a linear layer from the hidden size to the classes
        num_params += head
        per_module["classifier"] = head
    return ModelShape(
        num_params=num_params,
        num_trainable=num_params,
        largest_layer_params=max(per_module.values()),
        frozen_bytes=0,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=_first(config, "intermediate_size", "d_ff", "n_inner", default=4 * hidden),
        gated_mlp=any(name.endswith(("gate_proj.weight", "wi_0.weight", "w1.weight")) for name in shapes),
        vocab_size=_first(config, "vocab_size", default=0),
    )
