"""Run by test_quantized_sharding.py in a process of its own: what ZeRO-3 and FSDP2 do to bitsandbytes weights,
printed as one JSON line. One process, a world of 1 (gloo): what is asserted does not depend on the world size.

    python tests/integration/quantized_sharding_probe.py FOLDER
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantized(path: str, lora: bool, **bnb):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**bnb), device_map={"": "cpu"}, dtype=torch.float32
    )
    model = prepare_model_for_kbit_training(model, False)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0)) if lora else model


def zero3(model, bf16: bool):
    import deepspeed

    config = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config)[0]


def forward(model, ids) -> str:
    """'ok' or the error the forward raised."""
    try:
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        return "ok" if torch.isfinite(loss) else f"loss {loss}"
    except Exception as exc:  # the probe reports what happened; the test judges it
        return f"{type(exc).__name__}: {exc}"


def main(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no JIT build on CPU
    import deepspeed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    deepspeed.init_distributed(dist_backend="gloo")
    ids = torch.randint(0, 256, (1, 8))
    facts = {}

    # FSDP2 replaces each parameter by a sharded DTensor: does an 8-bit layer still run?
    model = quantized(folder, lora=False, load_in_8bit=True)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    facts["fsdp_8bit_forward"] = forward(model, ids)

    # ZeRO-3 swaps each parameter's data for its partition: what of the 8-bit matrix is still held?
    engine = zero3(quantized(folder, lora=True, load_in_8bit=True), bf16=False)
    weight = engine.module.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    facts["zero3_8bit"] = {
        "data": weight.data.numel(),
        "partition": weight.ds_tensor.numel(),
        "whole": weight.ds_numel,
        "CB": weight.CB.numel() if getattr(weight, "CB", None) is not None else 0,
    }

    # ZeRO-3 under bf16 casts every floating parameter to bf16: 4-bit weights packed into float32 and into bf16
    for storage in ("float32", "bfloat16"):
        model = quantized(
            folder,
            lora=True,
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=getattr(torch, storage),
        )
        facts[f"zero3_bf16_4bit_stored_in_{storage}"] = forward(zero3(model, bf16=True), ids)
    print(json.dumps(facts))


if __name__ == "__main__":
    main(sys.argv[1])
