"""Plan-time compatibility of strategy, offload, LoRA and quantization, and the DeepSpeed config the plan makes."""

from __future__ import annotations

import json

import pytest

from launcher.config.recipe import Recipe
from launcher.errors import RecipeError
from launcher.planning.compat import incompatibilities
from launcher.planning.plan import make_plan


def recipe(dist: dict | None = None, model: dict | None = None, train: dict | None = None) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": "org/m", **(model or {})},
            "task": {"type": "causal_lm"},
            "data": {"train": "t.jsonl"},
            "output_dir": "o",
            "distributed": dist or {},
            "train": {"batch_size": 32, **(train or {})},
        }
    )


def plan(r: Recipe, world: int = 4, device: str = "cuda"):
    return make_plan(r, num_train_samples=640, procs_per_node=world, device=device)


def refusal(r: Recipe, device: str = "cuda") -> str:
    with pytest.raises(RecipeError) as exc:
        plan(r, device=device)
    return str(exc.value)


LORA = {"lora": {"r": 8}}
REFUSED = [
    # (recipe, field named, advice given)
    (recipe(model={"quantization": {"bits": 4}}), "model.quantization", "add a model.lora section"),
    # 8-bit cannot be sharded: why, as tests/integration/test_quantized_sharding.py measures it
    (
        recipe({"strategy": "zero3"}, {**LORA, "quantization": {"bits": 8}}),
        "distributed.strategy",
        "does not partition",
    ),
    (recipe({"strategy": "fsdp"}, {**LORA, "quantization": {"bits": 8}}), "distributed.strategy", "Int8Params.CB"),
    (recipe({"offload": "cpu"}), "distributed.offload", "use zero2 or zero3 with offload"),
    (recipe({"strategy": "zero3", "offload": "nvme"}), "distributed.nvme_path", "needs nvme_path"),
    (recipe({"strategy": "fsdp", "offload": "nvme", "nvme_path": "/x"}), "distributed.offload", "use offload: cpu"),
    (
        recipe({"strategy": "zero2", "offload": "cpu", "offload_parameters": True}),
        "distributed.offload_parameters",
        "use zero3",
    ),
    (
        recipe({"strategy": "zero3", "offload_parameters": True}),
        "distributed.offload_parameters",
        "set distributed.offload: cpu",
    ),
    (recipe({"deepspeed_config": "ds.json"}), "distributed.deepspeed_config", "pick a ZeRO strategy"),
    (recipe({"strategy": "fsdp"}, train={"precision": "fp16"}), "train.precision", "use bf16"),
]


@pytest.mark.parametrize("case", range(len(REFUSED)))
def test_impossible_combinations_are_refused_with_what_to_use(case):
    r, field, advice = REFUSED[case]
    message = refusal(r)
    assert field in message and advice in message, message


def test_rewrites_to_working_equivalents_warn():
    quantized = plan(recipe({"strategy": "zero2", "offload": "cpu"}, {**LORA, "quantization": {"bits": 4}}))
    assert (quantized.strategy, quantized.offload) == ("ddp", "none") and "zero2 → ddp" in quantized.warnings[0]
    fsdp = plan(recipe({"strategy": "fsdp", "offload": "cpu"}))
    assert fsdp.offload_parameters and "offload_parameters → true" in fsdp.warnings[0]
    on_cpu = plan(recipe({"strategy": "fsdp", "offload": "cpu"}), device="cpu")
    assert on_cpu.offload == "none" and "cpu → none" in on_cpu.warnings[0]
    assert plan(recipe({"strategy": "zero3"})).warnings == []


def test_4bit_qlora_shards_under_zero3_and_fsdp():
    """QLoRA runs sharded as asked (no rewrite, no warning), offload included; 8-bit advises 4-bit or ddp."""
    for dist in ({"strategy": "zero3"}, {"strategy": "fsdp"}, {"strategy": "zero3", "offload": "cpu"}):
        p = plan(recipe(dist, {**LORA, "quantization": {"bits": 4}}))
        assert (p.strategy, p.offload, p.warnings) == (dist["strategy"], dist.get("offload", "none"), [])
    message = refusal(recipe({"strategy": "zero3"}, {**LORA, "quantization": {"bits": 8}}))
    assert "bits: 4 with zero3" in message and "strategy ddp with 8-bit" in message


def test_planner_can_filter_candidates():
    qlora = recipe(model={**LORA, "quantization": {"bits": 4}})
    assert incompatibilities(qlora, "ddp", "none") == []
    assert incompatibilities(qlora, "zero3", "cpu", offload_parameters=True) == []
    assert incompatibilities(qlora, "zero2", "none")  # only the adapters' optimizer states would be sharded
    eight = recipe(model={**LORA, "quantization": {"bits": 8}})
    assert [p.path for p in incompatibilities(eight, "fsdp", "none")] == ["distributed.strategy"]
    plain = recipe()
    assert incompatibilities(plain, "zero3", "cpu", offload_parameters=True) == []
    assert incompatibilities(plain, "zero3", "nvme", device="cpu")
    assert [p.path for p in incompatibilities(plain, "ddp", "cpu")] == ["distributed.offload"]


def test_generated_deepspeed_config_follows_the_plan():
    r = recipe(
        {"strategy": "zero3", "offload": "cpu", "offload_parameters": True},
        train={"micro_batch_size": 2, "grad_clip": 0.5, "precision": "bf16"},
    )
    p = plan(r)
    ds = p.deepspeed_config
    assert (
        (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
        == (32, 2, 4)
        == (p.global_batch_size, p.micro_batch_size, p.grad_accum)
    )
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    zero = ds["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    )
    assert "auto" not in json.dumps(ds) and "optimizer" not in ds
    assert plan(recipe({"strategy": "zero1"})).deepspeed_config["zero_optimization"]["stage"] == 1
    assert plan(recipe()).deepspeed_config is None and plan(recipe({"strategy": "fsdp"})).deepspeed_config is None


def test_user_deepspeed_config_is_checked_key_by_key(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 4,
                "gradient_accumulation_steps": "auto",
                "optimizer": {"type": "AdamW"},
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000},
            }
        )
    )
    message = refusal(recipe({"strategy": "zero2", "deepspeed_config": str(path)}, train={"micro_batch_size": 2}))
    assert "train_micro_batch_size_per_gpu: 4 disagrees with the plan's 2" in message
    assert (
        'gradient_accumulation_steps: "auto" is not accepted; the plan sets gradient_accumulation_steps = 4' in message
    )
    assert "remove the 'optimizer' block" in message
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "bf16": {"enabled": False}})
    )
    merged = plan(recipe({"strategy": "zero2", "deepspeed_config": str(path)})).deepspeed_config
    assert merged["zero_optimization"]["reduce_bucket_size"] == 1000 and merged["train_batch_size"] == 32
    assert merged["gradient_accumulation_steps"] == 1 and merged["train_micro_batch_size_per_gpu"] == 8
