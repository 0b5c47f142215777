"""Memory per GPU and host RAM per node, estimated from the model's config alone.

The model is built on the meta device (shapes, no storage), so a 70B plan takes
seconds on a laptop and never touches the weights. Model states follow
DeepSpeed's own accounting for mixed-precision Adam (the figures of
`estimate_zero2/3_model_states_mem_needs`, checked against them in the tests):

    per trainable parameter: 16-bit weight 2, 16-bit gradient 2, fp32 gradient 4,
    fp32 master weight 4, Adam moments 4 + 4  → 20 bytes (16 in plain fp32: 4 + 4 + 8)

and each strategy divides some of them by the number of GPUs N:

    ddp    nothing sharded, + DDP's gradient buckets (a second copy of the gradients in the parameters' dtype,
           allocated by DistributedDataParallel on more than one rank)
                                                zero1  optimizer + fp32 gradient / N
    zero2  + 16-bit gradient / N                zero3  weights, fp32 gradient, optimizer / N (18 bytes;
                                                       no 16-bit gradient partition) + 4 bytes × largest layer
    fsdp   like zero3, fp32 sharded weights (FSDP2 keeps fp32 shards and casts per layer: 16 bytes / N)

Offload moves the optimizer (and with zero3/fsdp the parameters) to host RAM,
where the optimizer step runs on an fp32 gradient, master weights and moments
(16 bytes per trainable parameter, + the 16-bit weights when they are offloaded too)
with DeepSpeed's 1.5× buffer factor for host memory.
Frozen weights (LoRA's base) carry no gradient or optimizer state; a bitsandbytes
base counts its packed bytes and quantization constants. zero3 and fsdp shard the
packed 4-bit weights like any other (stored in the shards' dtype, train.engines),
but not the constants (absmax, double-quant state): they are attributes of each
layer, whole on every rank.

Host RAM while loading and for checkpoints, and disk: planning/host_memory.py.

Activations per layer use Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models" (eq. 1: s·b·h·(34 + 5·a·s/h) bytes at
16 bits), with the MLP term written for the model's real intermediate size I and
gating, without the a·s² attention-score term because transformers runs
attention through SDPA (flash / memory-efficient kernels that store no scores),
and with the two norms kept in fp32 (transformers' RMSNorm upcasts, autocast runs
LayerNorm in fp32: 8·h more than the paper's 16-bit norms). Measured against the
tensors autograd really saves for a bf16 Llama in tests/test_memory.py:

    per layer: s·b·(26·h + k·I)      k = 8 for a gated MLP (gate, up, act, product), 4 otherwise
    checkpointed: 2·s·b·h per layer (its input) + one layer recomputed
    LM head: s·b·V·(2 + 4 + 4)       16-bit logits, their fp32 upcast for the loss, and its gradient
    pairs: all of it twice (chosen and rejected run as one batch); DPO adds the reference pass's logits
    (s·b·V·(2 + 4)) and, without LoRA, a frozen copy of the weights in the load dtype, sharded like them
             (the chunked loss, train.lm_loss: min(s·b, lm_loss_chunk) positions instead of s·b)

It is an estimate: allocator fragmentation, NCCL buffers and the CUDA context are
covered by keeping HEADROOM of each GPU free, not modelled.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from launcher.config.recipe import Recipe
from launcher.config.tasks import TASKS
from launcher.config.training import DTYPE_BYTES
from launcher.planning import speed
from launcher.planning.host_memory import host_load_bytes, reference_bytes, staging_bytes

GiB = 2**30
HEADROOM = 0.10  # of GPU memory kept free for the CUDA context, NCCL buffers and fragmentation
HOST_BUFFER = 1.5  # DeepSpeed's additional_buffer_factor for host-side (offloaded) states


class Choice(NamedTuple):
    """One way to run: a strategy and where the optimizer (and parameters) live."""

    strategy: str
    offload: Literal["none", "cpu", "nvme"] = "none"
    offload_parameters: bool = False

    @property
    def label(self) -> str:
        if self.offload == "none":
            return self.strategy
        what = "optimizer+parameters" if self.offload_parameters else "optimizer"
        return f"{self.strategy} + {self.offload} {what}"


# every choice the table shows; auto tries AUTO_ORDER, fastest first
CHOICES = [
    Choice("ddp"),
    Choice("zero1"),
    Choice("zero2"),
    Choice("zero3"),
    Choice("fsdp"),
    Choice("zero1", "cpu"),
    Choice("zero2", "cpu"),
    Choice("zero3", "cpu"),
    Choice("zero3", "cpu", True),
    Choice("fsdp", "cpu", True),
    Choice("zero3", "nvme", True),
]
AUTO_ORDER = [
    Choice("ddp"),
    Choice("zero2"),
    Choice("zero3"),
    Choice("zero2", "cpu"),
    Choice("zero3", "cpu"),
    Choice("zero3", "cpu", True),
    Choice("zero3", "nvme", True),
]


class ModelShape(BaseModel):
    """What the estimate needs to know of the model, read from its config on the meta device."""

    model_config = ConfigDict(frozen=True)

    num_params: int  # unique parameters of the model with its task head (and adapters)
    num_trainable: int  # full fine-tune: all; LoRA: adapters + modules_to_save
    largest_layer_params: int  # the biggest module (DeepSpeed's "largest layer"), gathered whole under zero3
    frozen_bytes: int  # bytes of the frozen weights as loaded (quantized where bitsandbytes packs them)
    quant_constant_bytes: int = 0  # of frozen_bytes: the 4-bit layers' constants, never sharded
    num_layers: int
    hidden_size: int
    intermediate_size: int
    gated_mlp: bool
    vocab_size: int


class Estimate(BaseModel):
    """Bytes per GPU by kind, and host RAM per node."""

    model_config = ConfigDict(frozen=True)

    choice: Choice
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    host_load: int  # per node, while the ranks load the pretrained weights
    host_offload: int  # per node, offloaded states during training (0 without offload)
    host_staging: int = 0  # per node: fsdp's background checkpoint writes copy each rank's states to host memory

    @property
    def per_gpu(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def host_per_node(self) -> int:
        return max(self.host_load, self.host_offload + self.host_staging)

    def fits(self, gpu_memory: int) -> bool:
        return self.per_gpu <= usable(gpu_memory)


def usable(gpu_memory: int) -> int:
    return int(gpu_memory * (1 - HEADROOM))


def gib(num_bytes: int) -> str:
    """GiB with one decimal; MiB below 1 GiB, so small models do not read 0.0."""
    if num_bytes < GiB:
        return f"{num_bytes / 2**20:.0f} MiB"
    return f"{num_bytes / GiB:.1f} GiB"


# ----------------------------------------------------------------------------- the model's shape
def _config_value(config, *names: str, default=None):
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _quantized_bytes(numel: int, out_features: int, recipe: Recipe) -> tuple[int, int]:
    """(packed weight, quantization constants) bytes of one bitsandbytes Linear weight: LLM.int8 (int8 + an fp32
    scale per row) or 4-bit in blocks of 64 (an absmax per block; double quant: 8-bit absmax + fp32 per 256)."""
    quant = recipe.model.quantization
    if quant.bits == 8:
        return numel, 4 * out_features
    blocks = math.ceil(numel / 64)
    constants = blocks + 4 * math.ceil(blocks / 256) if quant.double_quant else 4 * blocks
    return math.ceil(numel / 2), constants


def _head_names(model) -> set[str]:
    """The output layer (lm_head, classifier, score): never quantized, never a LoRA target under all-linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names | {name for name, _ in model.named_modules() if name.split(".")[-1] in ("classifier", "score")}


@functools.lru_cache(maxsize=16)
def _meta_model(path: str, task: str, num_labels: int, trust_remote_code: bool):
    import torch
    import transformers

    spec = TASKS[task]
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not spec.language_model:
        config.num_labels = num_labels
    with torch.device("meta"):
        model = getattr(transformers, spec.auto_class).from_config(config, trust_remote_code=trust_remote_code)
    return config, model


def model_shape(recipe: Recipe) -> ModelShape:
    """Count parameters from the config on the meta device; apply LoRA and quantization by their rules."""
    import torch

    from launcher.config.loading import resolve_model_path
    from launcher.errors import Problem, RecipeError

    try:
        config, model = _meta_model(
            resolve_model_path(recipe.model.path),
            recipe.task.type,
            recipe.task.resolved_num_labels,
            recipe.model.trust_remote_code,
        )
    except (OSError, ValueError, KeyError) as exc:  # a hub id offline, an unknown model_type, a broken config
        why = f"the memory estimate needs the model's config, which could not be read: {str(exc).splitlines()[0][:160]}"
        raise RecipeError("plan", [Problem("model.path", why)]) from None
    weight_bytes = DTYPE_BYTES[recipe.model.dtype]
    lora, quant = recipe.model.lora, recipe.model.quantization
    heads = _head_names(model)
    num_params = frozen_bytes = constant_bytes = num_trainable = largest = 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
        if own == 0:
            continue
        is_linear = isinstance(module, torch.nn.Linear)
        is_head = name in heads
        num_params += own
        adapted = (
            lora is not None
            and is_linear
            and not is_head
            and (lora.target_modules == "all-linear" or _matches(name, lora.target_modules))
        )
        saved = lora is not None and (
            (lora.modules_to_save == "auto" and is_head and not recipe.task.spec.language_model)
            or (lora.modules_to_save != "auto" and _matches(name, lora.modules_to_save))
        )
        if lora is None or saved:
            num_trainable += own
        else:
            if quant is not None and is_linear and not is_head:
                packed, constants = _quantized_bytes(module.weight.numel(), module.out_features, recipe)
                frozen_bytes += packed + constants
                constant_bytes += constants if quant.bits == 4 else 0
                frozen_bytes += (own - module.weight.numel()) * weight_bytes  # biases stay unquantized
            else:
                frozen_bytes += own * weight_bytes
        if adapted:
            adapter = lora.r * (module.in_features + module.out_features) + (
                module.out_features if lora.use_dora else 0
            )
            num_trainable += adapter
            num_params += adapter
    # tied weights appear under two modules but are one tensor
    unique = sum(p.numel() for p in model.parameters())
    tied = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) - unique
    num_params -= tied
    if lora is None:
        num_trainable -= tied
    else:
        frozen_bytes -= tied * weight_bytes
    hidden = _config_value(config, "hidden_size", "d_model", "n_embd")
    layers = _config_value(config, "num_hidden_layers", "n_layer", "num_layers") + (
        _config_value(config, "num_decoder_layers", default=0) if getattr(config, "is_encoder_decoder", False) else 0
    )
    gated = any(name.endswith(("gate_proj", "wi_0", "w1")) for name, _ in model.named_modules())
    return ModelShape(
        num_params=num_params,
        num_trainable=num_trainable,
        largest_layer_params=largest,
        frozen_bytes=max(0, frozen_bytes),
        quant_constant_bytes=constant_bytes,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=_config_value(config, "intermediate_size", "d_ff", "n_inner", default=4 * hidden),
        gated_mlp=gated,
        vocab_size=config.vocab_size,
    )


# ----------------------------------------------------------------------------- the estimate
def activation_bytes(shape: ModelShape, recipe: Recipe, micro_batch: int, strategy: str = "ddp") -> int:
    """Activations kept for backward at the micro-batch and max_length (Korthikanti et al. 2022, see above).
    The chunked causal-LM loss (train.lm_loss, launcher.planning.speed) holds one chunk of logits at a time."""
    s, b, h = recipe.data.max_length, micro_batch, shape.hidden_size
    half = recipe.train.precision != "fp32" or recipe.model.dtype != "fp32"
    scale = 1 if half else 2  # the formula counts 16-bit activations
    per_layer = s * b * (26 * h + (8 if shape.gated_mlp else 4) * shape.intermediate_size) * scale
    if recipe.distributed.activation_checkpointing:
        layers = shape.num_layers * 2 * s * b * h * scale + per_layer
    else:
        layers = shape.num_layers * per_layer
    positions = s * b
    if speed.lm_loss(recipe, strategy) != "full":  # chunked (liger: less still, never the logits; counted alike)
        positions = min(positions, recipe.train.lm_loss_chunk)
    head = positions * shape.vocab_size * (2 * scale + 8) if recipe.task.spec.language_model else 0
    if recipe.task.uses_reference:  # the reference pass's logits and their fp32 upcast, held for the loss
        head += s * b * shape.vocab_size * (scale + 4)
    # a preference or reward pair runs its chosen and rejected answers in one batch: twice the sequences
    return (layers + head) * recipe.task.spec.sequences_per_row


def estimate(
    shape: ModelShape,
    recipe: Recipe,
    choice: Choice,
    *,
    num_nodes: int,
    gpus_per_node: int,
    micro_batch: int,
    device: Literal["cpu", "cuda"] = "cuda",
) -> Estimate:
    """Memory per GPU for `choice`, and host RAM per node (see the module docstring for the accounting).
    `device` cpu: the ranks are CPU processes, whose "GPU" memory is host memory too."""
    world = num_nodes * gpus_per_node
    trainable, strategy = shape.num_trainable, choice.strategy
    half = recipe.train.precision != "fp32" or recipe.model.dtype != "fp32"
    # bytes per trainable parameter: working weight, its gradient, fp32 gradient copy, fp32 master, Adam moments
    weight, grad, grad32, master, moments = (2, 2, 4, 4, 8) if half else (4, 4, 0, 0, 8)
    if strategy == "zero3":  # gradients are reduce-scattered straight into the fp32 partition
        grad, grad32 = 0, 4
    if strategy == "fsdp":  # FSDP2 keeps fp32 shards (they are the master) and casts each layer when gathered
        weight, grad, grad32, master = 4, 4, 0, 0
    # divisors of: weights, working gradients, fp32 optimizer side (fp32 gradient, master, moments)
    shard_weights, shard_grads, shard_states = {
        "ddp": (1, 1, 1),
        "zero1": (1, 1, world),
        "zero2": (1, world, world),
    }.get(strategy, (world, world, world))
    gathered = 2 * shape.largest_layer_params if strategy in ("zero3", "fsdp") else 0  # its 16-bit weights, and grads
    whole = shape.quant_constant_bytes if strategy in ("zero3", "fsdp") else 0  # 4-bit constants: not sharded
    held = trainable * weight + shape.frozen_bytes + reference_bytes(shape, recipe)  # DPO's reference copy too
    params = (held - whole) // shard_weights + whole + gathered
    grads = trainable * grad // shard_grads + trainable * grad32 // shard_states + gathered
    if strategy == "ddp" and world > 1:  # DistributedDataParallel's buckets, in the parameters' dtype
        grads += trainable * DTYPE_BYTES[recipe.model.dtype]
    optimizer = trainable * (master + moments) // shard_states
    host_offload = 0
    if choice.offload != "none":
        # the optimizer steps on the host (DeepSpeedCPUAdam, FSDP's CPUOffloadPolicy): an fp32 gradient,
        # the master weights and the moments live there; the GPU keeps the weights and one layer's gradients
        host = trainable * (4 + master + moments) // world
        grads, optimizer = gathered, 0
        if choice.offload_parameters:
            host += params - gathered
            params = gathered
        host_offload = int(host * gpus_per_node * HOST_BUFFER) if choice.offload == "cpu" else 0
    return Estimate(
        choice=choice,
        parameters=params,
        gradients=grads,
        optimizer=optimizer,
        activations=activation_bytes(shape, recipe, micro_batch, strategy),
        host_load=host_load_bytes(shape, recipe, strategy, num_nodes * gpus_per_node, gpus_per_node, device),
        host_offload=host_offload,
        host_staging=staging_bytes(shape, recipe, strategy, world) * gpus_per_node,
    )


def estimates(
    recipe: Recipe, shape: ModelShape, *, num_nodes: int, gpus_per_node: int, micro_batch: int
) -> list[tuple[Estimate, list]]:
    """Every choice of the table with its estimate and the compatibility problems that refuse it."""
    from launcher.planning.compat import incompatibilities

    return [
        (
            estimate(shape, recipe, choice, num_nodes=num_nodes, gpus_per_node=gpus_per_node, micro_batch=micro_batch),
            incompatibilities(recipe, choice.strategy, choice.offload, offload_parameters=choice.offload_parameters),
        )
        for choice in CHOICES
    ]


def choose(
    recipe: Recipe, shape: ModelShape, *, num_nodes: int, gpus_per_node: int, micro_batch: int, gpu_memory: int
) -> tuple[Choice, str]:
    """`strategy: auto`: the first of AUTO_ORDER (fastest first) that the rules allow and that fits, and why."""
    from launcher.errors import Problem, RecipeError
    from launcher.planning.compat import incompatibilities

    budget = usable(gpu_memory)
    over = []
    for choice in AUTO_ORDER:
        if incompatibilities(recipe, choice.strategy, choice.offload, offload_parameters=choice.offload_parameters):
            continue
        est = estimate(shape, recipe, choice, num_nodes=num_nodes, gpus_per_node=gpus_per_node, micro_batch=micro_batch)
        if est.fits(gpu_memory):
            faster = f"; faster choices do not fit: {', '.join(over)}" if over else ""
            return choice, (
                f"fastest that fits: {gib(est.per_gpu)} per GPU of {gib(budget)} usable "
                f"({100 - int(HEADROOM * 100)}% of {gib(gpu_memory)}){faster}"
            )
        over.append(f"{choice.label} {gib(est.per_gpu)}")
    hints = [] if recipe.distributed.activation_checkpointing else ["activation_checkpointing: true"]
    hints += ["more GPUs or nodes", "a smaller train.micro_batch_size or data.max_length"]
    if recipe.model.lora is None:
        hints.append("model.lora (with model.quantization for QLoRA)")
    raise RecipeError(
        "plan",
        [
            Problem(
                "distributed.strategy",
                f"auto: nothing fits in {gib(budget)} usable per GPU ({', '.join(over)}); try {', '.join(hints)}",
            )
        ],
    )
