"""Model and tokenizer: load pretrained weights with the task's head, quantize, add LoRA.

`build` runs the stages in order, each taking the model the previous one
returned: load (bitsandbytes quantizes while loading) → k-bit preparation or
activation checkpointing → LoRA adapters (the task head trained in full).
With `on_meta` the same stages build the model on the meta device (shapes, no
storage, no weights read): the ranks of a strategy that loads the weights once
(train.engines.fsdp_loading) mirror rank 0's model that way.
"""

from __future__ import annotations

import torch

from launcher.config.loading import resolve_model_path
from launcher.config.recipe import Recipe
from launcher.train.tasks import TaskHooks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def auto_class(recipe: Recipe):
    """transformers' Auto* class of the recipe's task type (config.tasks: the head it adds)."""
    import transformers

    return getattr(transformers, recipe.task.spec.auto_class)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    path = resolve_model_path(recipe.model.path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without a pad token
    return tokenizer


def bnb_config(recipe: Recipe, quant_storage: torch.dtype | None = None):
    """`quant_storage`: the dtype the packed 4-bit weights are stored in (None: bitsandbytes' uint8). A strategy
    that shards parameters asks for the dtype of its shards (engines: Engine.quant_storage), so that casting
    the shards to that dtype leaves the packed bytes as they are."""
    from transformers import BitsAndBytesConfig

    quant = recipe.model.quantization
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def keep_4bit_packing(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU kernel. On a CPU with AVX512-BF16, the first
    eval-mode forward of a Linear4bit without gradients rewrites its weight into another layout and changes
    the layer's shared quant_state with it (bitsandbytes 0.50, Linear4bit.forward). Under a strategy that
    gathers the weight anew for every forward (fsdp, zero3) the next gather brings the original packing back
    under the changed quant_state: measured, the training loss after the first evaluation jumped back to its
    first-step value. Sharded runs therefore keep the packing they were loaded with (on GPUs this is moot)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


HEAD_NAMES = ("classifier", "score")  # the freshly initialised heads of Auto*ForSequence/TokenClassification


def head_modules(model: torch.nn.Module, recipe: Recipe) -> list[str]:
    """The task head, which LoRA must train in full: it starts random. A language model's head is pretrained."""
    if recipe.task.spec.language_model:
        return []
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


def add_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = recipe.model.lora
    to_save = head_modules(model, recipe) if cfg.modules_to_save == "auto" else list(cfg.modules_to_save)
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_dora=cfg.use_dora,
        target_modules=cfg.target_modules,
        modules_to_save=to_save or None,
        task_type=recipe.task.spec.peft_task_type,
    )
    return get_peft_model(model, config)


def build(
    recipe: Recipe,
    tokenizer,
    device: torch.device | str = "cpu",
    *,
    quant_storage: torch.dtype | None = None,
    on_meta: bool = False,
) -> torch.nn.Module:
    """The model to train on `device` (where a quantized model is loaded: bitsandbytes cannot move it later).
    `quant_storage`: see bnb_config. `on_meta`: the same model on the meta device, no weights read (a 4-bit
    layer then holds its unquantized shape: the loader of engines/fsdp_loading.py gives it rank 0's)."""
    task = recipe.task
    kwargs: dict = {
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "dtype": DTYPES[recipe.model.dtype],
        "attn_implementation": recipe.model.attn_implementation,
    }
    if task.spec.hf_problem_type is not None:  # a classifier head, sized to the classes
        kwargs["num_labels"] = task.resolved_num_labels
        kwargs["problem_type"] = task.spec.hf_problem_type
        if task.labels:
            kwargs["id2label"] = dict(enumerate(task.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(task.labels)}
    if recipe.model.quantization is not None:
        kwargs["quantization_config"] = bnb_config(recipe, quant_storage)
        kwargs["device_map"] = {"": device}
    if on_meta:
        kwargs["device_map"] = {"": "meta"}
    model = auto_class(recipe).from_pretrained(resolve_model_path(recipe.model.path), **kwargs)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
    if recipe.model.quantization is not None:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and head, input grads for the frozen base; checkpointing only if the recipe asks
        model = prepare_model_for_kbit_training(model, recipe.distributed.activation_checkpointing, checkpointing)
        if quant_storage is not None:  # a sharded strategy
            keep_4bit_packing(model)
    elif recipe.distributed.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if recipe.model.lora is not None:
        model = add_lora(model, recipe)
    if recipe.model.adapter is not None:  # a trained adapter (and its task head), e.g. for `launch eval`
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, recipe.model.adapter, is_trainable=True)
    if recipe.train.compile:
        compile_blocks(model)
    return model


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional compilation (train.compile): each repeated transformer block (the model's `_no_split_modules`
    classes) is compiled in place, so one graph serves every layer and compiles in seconds, not minutes, and
    parameter names stay those of the checkpoint. The number of blocks compiled."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_types = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_types]
    repeated = {name for name in block_types if sum(type(m).__name__ == name for m in blocks) > 1}
    compiled = [m for m in blocks if type(m).__name__ in repeated]
    if not compiled:
        raise ValueError(f"train.compile: {type(base).__name__} names no repeated block to compile regionally")
    for module in compiled:
        module.compile()
    return len(compiled)


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], task: TaskHooks) -> torch.Tensor:
    return task.logits(model, batch)
