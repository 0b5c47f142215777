"""Host RAM per node while the ranks load the weights and while fsdp writes a checkpoint in the background,
and disk per run, from the model's shape (planning/memory.py counts it on the meta device).

Loading (host_load_per_rank): a rank that loads the pretrained weights holds all of them (transformers maps
the safetensors files: their pages become resident as the weights are first read); under fsdp only rank 0
does (train/engines/fsdp_loading.py) and the others hold their shards (in host memory on CPU ranks) plus
one shard in flight; zero3 without LoRA loads through deepspeed.zero.Init, once per node. On CPU ranks the
window also holds what wrapping the model allocates in host memory: DDP's gradient buckets. bench/memory.py
measures it against a real load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from launcher.config.recipe import Recipe
from launcher.config.training import DTYPE_BYTES

if TYPE_CHECKING:
    from launcher.planning.memory import ModelShape


def reference_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """A frozen copy of the model as loaded: DPO's reference when the whole model trains (with LoRA the
    reference is the base itself, its adapter disabled). Loaded like the model, sharded like its weights."""
    if not recipe.task.uses_reference or recipe.model.lora is not None:
        return 0
    return shape.num_params * DTYPE_BYTES[recipe.model.dtype]


def host_load_per_rank(
    shape: ModelShape, recipe: Recipe, strategy: str, world: int, device: Literal["cpu", "cuda"] = "cuda"
) -> tuple[int, int]:
    """Host RAM of (rank 0, any other rank) once the model is loaded (see the module docstring)."""
    # the reference copy is read the same way, once the model is held (counted as if both were whole at once)
    whole = shape.frozen_bytes + shape.num_trainable * DTYPE_BYTES[recipe.model.dtype] + reference_bytes(shape, recipe)
    if world == 1:
        return whole, 0
    if strategy == "zero3" and recipe.model.lora is None:  # zero.Init: each rank keeps its partition only
        return whole, 0
    largest = shape.largest_layer_params * DTYPE_BYTES[recipe.model.dtype]
    if strategy != "fsdp":
        # CPU ranks: DDP's gradient buckets (allocated when the model is wrapped) are host memory too
        buckets = shape.num_trainable * DTYPE_BYTES[recipe.model.dtype] if strategy == "ddp" and device == "cpu" else 0
        return whole + buckets, whole + buckets
    if device == "cuda":  # the shards and the shard in flight are on the GPUs
        return whole, 0
    replicated = shape.quant_constant_bytes
    shard = (whole - replicated) // world + replicated
    # rank 0 holds its shards beside the whole model until scattered; a shard that is not a whole chunk (rows not
    # dividing evenly) goes through a buffer on the receiving rank and a padded copy on rank 0
    return whole + shard + largest, shard + largest // world


def host_load_bytes(
    shape: ModelShape,
    recipe: Recipe,
    strategy: str,
    world: int,
    gpus_per_node: int,
    device: Literal["cpu", "cuda"] = "cuda",
) -> int:
    """Host RAM of the node with rank 0 while loading: rank 0 and its node's other ranks."""
    first, other = host_load_per_rank(shape, recipe, strategy, world, device)
    return first + (gpus_per_node - 1) * other


def staging_bytes(shape: ModelShape, recipe: Recipe, strategy: str, world: int) -> int:
    """Per rank: the host copy of its share of a checkpoint while fsdp writes it in the background."""
    if strategy != "fsdp" or not recipe.train.checkpoint_async:
        return 0
    return checkpoint_bytes(shape, recipe) // world


def disk_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """Disk at output_dir for a run: train.keep_last checkpoints, one more while the next is written (the
    oldest goes only once it is complete), the best one (train.keep_best), and the exported final model. A
    checkpoint holds the whole model in its load dtype and the optimizer's fp32 moments (+ fp32 master weights
    under mixed precision) of the trainable parameters, whatever the strategy: sharded states add up to the
    same bytes."""
    model = shape.frozen_bytes + shape.num_trainable * DTYPE_BYTES[recipe.model.dtype]
    kept = recipe.train.keep_last + 1 + (1 if recipe.train.keep_best is not None else 0)  # + the best one
    return kept * checkpoint_bytes(shape, recipe) + model


def checkpoint_bytes(shape: ModelShape, recipe: Recipe) -> int:
    """One checkpoint: the model in its load dtype, and the optimizer's fp32 moments (+ fp32 master weights
    under mixed precision) of the trainable parameters."""
    model = shape.frozen_bytes + shape.num_trainable * DTYPE_BYTES[recipe.model.dtype]
    half = recipe.train.precision != "fp32" or recipe.model.dtype != "fp32"
    return model + shape.num_trainable * (8 + (4 if half else 0))
