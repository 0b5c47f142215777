"""The memory planner: model states against DeepSpeed's own estimators, LoRA and 4/8-bit against hand-computed
bytes and against peft, `strategy: auto` on a 70B and a 100M model (`launch plan` itself:
tests/integration/test_plan_command.py)."""

from __future__ import annotations

import json
import re

import pytest
from helpers import RECIPES

from launcher.config.recipe import Recipe
from launcher.errors import RecipeError
from launcher.planning import memory
from launcher.planning.memory import Choice
from launcher.planning.plan import make_plan

GiB = 2**30
LLAMA_70B = RECIPES / "models" / "llama-2-70b-config"
# hidden 64, 2 layers, 4 heads, 2 KV heads (k/v project to 32), SwiGLU 128, vocab 1000, untied head
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    tie_word_embeddings=False,
)
# about 100M parameters: hidden 768, 10 layers, SwiGLU 2048, vocab 32000, tied embeddings
LLAMA_100M = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=10,
    num_attention_heads=12,
    num_key_value_heads=12,
    vocab_size=32000,
    tie_word_embeddings=True,
)
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)


def llama_folder(tmp_path, **fields) -> str:
    """A config-only Llama folder: all the planner reads."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, **fields}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def recipe(path: str, *, model=None, distributed=None, max_length=512, micro=1, precision="bf16") -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": path, "dtype": "bf16", **(model or {})},
            "task": {"type": "causal_lm"},
            "data": {"train": "train.jsonl", "max_length": max_length},
            "train": {"batch_size": 64, "micro_batch_size": micro, "precision": precision},
            "distributed": distributed or {},
            "output_dir": "out",
        }
    )


def model_states(est: memory.Estimate) -> int:
    return est.parameters + est.gradients + est.optimizer


def deepspeed_tables(capsys, total: int, largest: int, gpus: int, nodes: int) -> dict[str, tuple[float, float]]:
    """What DeepSpeed's all_cold estimators print: options → (per CPU GiB, per GPU GiB)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=gpus, num_nodes=nodes)
    zero2 = capsys.readouterr().out
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node=gpus, num_nodes=nodes)
    zero3 = capsys.readouterr().out
    rows = {}
    for stage, text in (("zero2", zero2), ("zero3", zero3)):
        for cpu, gpu, options in re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.+)", text):
            rows[f"{stage}: {options.replace('OffloadDeviceEnum.', '').strip()}"] = (float(cpu), float(gpu))
    return rows


@pytest.mark.parametrize("config", ["llama_100m", "llama_1b", "llama_70b"])
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 4), (2, 8), (4, 8)])
def test_model_states_match_deepspeed_estimators(config, nodes, gpus, tmp_path, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    path = (
        str(LLAMA_70B)
        if config == "llama_70b"
        else llama_folder(tmp_path, **{"llama_100m": LLAMA_100M, "llama_1b": LLAMA_1B}[config])
    )
    r = recipe(path)
    shape = memory.model_shape(r)
    total, largest = shape.num_params, shape.largest_layer_params
    if config == "llama_70b":
        assert total == 68_976_648_192 and largest == 32000 * 8192  # Llama-2-70B; its largest layer is the embedding

    def ours(choice):
        return memory.estimate(shape, r, choice, num_nodes=nodes, gpus_per_node=gpus, micro_batch=1)

    # exact bytes against the functions the estimators print from
    for offload, choice in ((False, Choice("zero2")), (True, Choice("zero2", "cpu"))):
        _, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        assert abs(model_states(ours(choice)) - gpu) <= 4
    for offload, params, choice in (
        (False, False, Choice("zero3")),
        (True, False, Choice("zero3", "cpu")),
        (True, True, Choice("zero3", "cpu", True)),
    ):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=params, zero_init=True
        )
        assert abs(model_states(ours(choice)) - gpu) <= 4
        if offload:  # host RAM per node for the offloaded states, DeepSpeed's zero.Init figure
            assert ours(choice).host_offload == pytest.approx(cpu, rel=1e-6)
    # and the tables the all_cold estimators print (GiB, 2 decimals)
    printed = deepspeed_tables(capsys, total, largest, gpus, nodes)
    for key, choice in (
        ("zero2: offload_optimizer=none", Choice("zero2")),
        ("zero2: offload_optimizer=cpu", Choice("zero2", "cpu")),
        ("zero3: offload_param=none, offload_optimizer=none, zero_init=1", Choice("zero3")),
        ("zero3: offload_param=none, offload_optimizer=cpu, zero_init=1", Choice("zero3", "cpu")),
        ("zero3: offload_param=cpu, offload_optimizer=cpu, zero_init=1", Choice("zero3", "cpu", True)),
    ):
        assert model_states(ours(choice)) / GiB == pytest.approx(printed[key][1], abs=0.006), key


def test_ddp_and_zero1_follow_the_same_accounting(tmp_path):
    """ddp is zero2 on one GPU (20 bytes per parameter), + DDP's gradient buckets (the parameters' dtype) on more
    than one; zero1 shards only the fp32 side."""
    r = recipe(llama_folder(tmp_path, **SMALL))
    shape = memory.model_shape(r)
    n = shape.num_params
    ddp = memory.estimate(shape, r, Choice("ddp"), num_nodes=2, gpus_per_node=4, micro_batch=1)
    zero1 = memory.estimate(shape, r, Choice("zero1"), num_nodes=2, gpus_per_node=4, micro_batch=1)
    assert (ddp.parameters, ddp.gradients, ddp.optimizer) == (2 * n, 6 * n + 2 * n, 12 * n)
    assert (zero1.parameters, zero1.gradients, zero1.optimizer) == (2 * n, 2 * n + 4 * n // 8, 12 * n // 8)
    fp32 = recipe(llama_folder(tmp_path, **SMALL), model={"dtype": "fp32"}, precision="fp32")
    plain = memory.estimate(memory.model_shape(fp32), fp32, Choice("ddp"), num_nodes=1, gpus_per_node=1, micro_batch=1)
    assert (plain.parameters, plain.gradients, plain.optimizer) == (4 * n, 4 * n, 8 * n)


def test_parameter_count_of_a_small_llama_by_hand(tmp_path):
    shape = memory.model_shape(recipe(llama_folder(tmp_path, **SMALL)))
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q, o; k, v; gate, up, down; two norms
    assert shape.num_params == shape.num_trainable == 1000 * 64 * 2 + 2 * layer + 64  # embed + head, final norm
    assert shape.largest_layer_params == 64000 and shape.gated_mlp and shape.num_layers == 2


LORA_QV = {"r": 8, "target_modules": ["q_proj", "v_proj"]}
BASE_PARAMS = 1000 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64


def test_lora_memory_by_hand(tmp_path):
    """Only the adapters carry gradients and optimizer states; the bf16 base is 2 bytes a parameter."""
    r = recipe(llama_folder(tmp_path, **SMALL), model={"lora": LORA_QV})
    shape = memory.model_shape(r)
    adapters = 2 * (8 * (64 + 64) + 8 * (64 + 32))  # two layers of q (64→64) and v (64→32)
    assert adapters == 3584
    assert shape.num_trainable == adapters and shape.num_params == BASE_PARAMS + adapters
    assert shape.frozen_bytes == 2 * BASE_PARAMS
    est = memory.estimate(shape, r, Choice("ddp"), num_nodes=1, gpus_per_node=2, micro_batch=1)
    assert (est.parameters, est.gradients, est.optimizer) == (
        2 * adapters + 2 * BASE_PARAMS,
        6 * adapters + 2 * adapters,  # DDP's buckets hold the adapters' gradients only
        12 * adapters,
    )
    zero3 = memory.estimate(shape, r, Choice("zero3"), num_nodes=1, gpus_per_node=2, micro_batch=1)
    assert zero3.parameters == (2 * adapters + 2 * BASE_PARAMS) // 2 + 2 * 64000  # the frozen base is sharded too


def test_4bit_and_8bit_base_by_hand(tmp_path):
    """bitsandbytes packs every Linear but the head: nf4 = half a byte + one 8-bit absmax per 64 weights
    + one fp32 per 256 absmax (double quant); LLM.int8 = a byte + one fp32 scale per output row."""
    path = llama_folder(tmp_path, **SMALL)
    linears = [
        (64 * 64, 64),
        (64 * 32, 32),
        (64 * 32, 32),
        (64 * 64, 64),
        (64 * 128, 128),
        (64 * 128, 128),
        (128 * 64, 64),
    ]  # q, k, v, o, gate, up, down: (weights, output rows)
    unquantized = 2 * (1000 * 64 * 2 + 2 * 2 * 64 + 64)  # bf16 embed, head and norms
    adapters = 3584

    def nf4(n):
        blocks = -(-n // 64)
        return n // 2 + blocks + 4 * -(-blocks // 256)

    four = recipe(path, model={"lora": LORA_QV, "quantization": {"bits": 4}})
    eight = recipe(path, model={"lora": LORA_QV, "quantization": {"bits": 8}})
    assert memory.model_shape(four).frozen_bytes == unquantized + 2 * sum(nf4(n) for n, _ in linears)
    assert memory.model_shape(four).frozen_bytes == 128000 * 2 + 4 * 128 + 128 + 2 * (
        2116 + 1060 + 1060 + 2116 + 3 * 4228
    )
    assert memory.model_shape(eight).frozen_bytes == unquantized + 2 * sum(n + 4 * rows for n, rows in linears)
    est = memory.estimate(memory.model_shape(four), four, Choice("ddp"), num_nodes=1, gpus_per_node=1, micro_batch=1)
    assert model_states(est) == memory.model_shape(four).frozen_bytes + 20 * adapters


def test_lora_trainable_count_matches_peft(tmp_path):
    """The same adapters peft really builds, for a target list, all-linear, and DoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    path = llama_folder(tmp_path, **SMALL)
    for lora in (
        LORA_QV,
        {"r": 4, "target_modules": "all-linear"},
        {"r": 4, "target_modules": "all-linear", "use_dora": True},
    ):
        shape = memory.model_shape(recipe(path, model={"lora": lora}))
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**SMALL))
        peft_model = get_peft_model(
            model, LoraConfig(r=lora["r"], target_modules=lora["target_modules"], use_dora=lora.get("use_dora", False))
        )
        trainable, total = peft_model.get_nb_trainable_parameters()
        assert (shape.num_trainable, shape.num_params) == (trainable, total), lora


def test_activations_by_formula_and_checkpointing(tmp_path):
    """Korthikanti et al. 2022 with SDPA attention and fp32 norms: s·b·(26h + 8I) per gated layer at 16 bits,
    + LM head logits."""
    r = recipe(llama_folder(tmp_path, **SMALL), max_length=256, micro=2)
    shape = memory.model_shape(r)
    per_layer = 256 * 2 * (26 * 64 + 8 * 128)
    head = 256 * 2 * 1000 * 10
    assert memory.activation_bytes(shape, r, 2) == 2 * per_layer + head
    ckpt = recipe(
        llama_folder(tmp_path, **SMALL), max_length=256, micro=2, distributed={"activation_checkpointing": True}
    )
    assert memory.activation_bytes(shape, ckpt, 2) == 2 * (2 * 256 * 2 * 64) + per_layer + head


@pytest.mark.parametrize(
    "config,seq", [(SMALL, 256), ({**SMALL, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3}, 128)]
)
def test_layer_activations_match_what_autograd_saves(config, seq, tmp_path):
    """The per-layer formula against the bytes of the tensors autograd keeps for backward in a real bf16 Llama
    (weights excluded), within 5%: the formula is a plan, not a guess."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    r = recipe(llama_folder(tmp_path, **config), max_length=seq, micro=2)
    expected = memory.activation_bytes(memory.model_shape(r), r, 2) - seq * 2 * 1000 * 10  # without the LM head
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.model(input_ids=torch.randint(0, 1000, (2, seq)), use_cache=False)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.05)


def plan_for(r: Recipe, *, nodes: int, gpus: int, gpu_memory: str = "80GiB"):
    from launcher.config.cluster import parse_bytes

    return make_plan(
        r,
        num_train_samples=1024,
        procs_per_node=gpus,
        num_nodes=nodes,
        device="cuda",
        gpu_memory=parse_bytes(gpu_memory),
    )


def test_auto_picks_zero3_with_offload_for_70b_on_four_80gib_gpus():
    r = recipe(str(LLAMA_70B), max_length=4096, distributed={"strategy": "auto", "activation_checkpointing": True})
    plan = plan_for(r, nodes=1, gpus=4)
    assert (plan.strategy, plan.offload, plan.offload_parameters) == ("zero3", "cpu", False)
    assert "faster choices do not fit: ddp" in plan.strategy_reason and "zero3 298.0 GiB" in plan.strategy_reason
    # with 32 GPUs the shards are small enough without offload
    assert (plan_for(r, nodes=4, gpus=8).strategy, plan_for(r, nodes=4, gpus=8).offload) == ("zero3", "none")


def test_auto_picks_ddp_for_a_100m_model(tmp_path):
    r = recipe(llama_folder(tmp_path, **LLAMA_100M), distributed={"strategy": "auto"})
    assert 90e6 < memory.model_shape(r).num_params < 110e6
    plan = plan_for(r, nodes=1, gpus=8, gpu_memory="24GiB")
    assert (plan.strategy, plan.offload) == ("ddp", "none") and plan.strategy_reason.startswith("fastest that fits")


def test_auto_shards_a_4bit_base_and_never_picks_a_refused_combination(tmp_path):
    """A 4-bit 70B base is 37 GiB: ddp does not fit in 40 GiB, zero2 is refused with a quantized base, and zero3
    shards the packed weights (QLoRA under ZeRO-3); on 80 GiB ddp fits. An 8-bit base (70 GiB) fits nowhere:
    zero3 cannot shard it."""
    dist = {"strategy": "auto", "activation_checkpointing": True}

    def qlora(bits: int) -> Recipe:
        model = {"lora": LORA_QV, "quantization": {"bits": bits}}
        return recipe(str(LLAMA_70B), max_length=4096, model=model, distributed=dist)

    r, eight = qlora(4), qlora(8)
    chosen = plan_for(r, nodes=1, gpus=4, gpu_memory="40GiB")
    assert chosen.strategy == "zero3" and "zero2" not in chosen.strategy_reason and "ddp" in chosen.strategy_reason
    assert plan_for(r, nodes=1, gpus=4, gpu_memory="80GiB").strategy == "ddp"
    with pytest.raises(RecipeError, match="auto: nothing fits in 36.0 GiB usable per GPU") as info:
        plan_for(eight, nodes=1, gpus=4, gpu_memory="40GiB")
    assert "zero3" not in str(info.value) and "more GPUs or nodes" in str(info.value)


def test_auto_on_cpu_is_ddp_and_on_gpu_needs_the_gpu_memory(tmp_path):
    r = recipe(llama_folder(tmp_path, **SMALL), distributed={"strategy": "auto"})
    assert make_plan(r, num_train_samples=128, procs_per_node=2).strategy == "ddp"
    with pytest.raises(RecipeError, match="auto needs the memory per GPU: set gpu_memory"):
        make_plan(r, num_train_samples=128, procs_per_node=2, device="cuda")


def test_compatibility_rules_refuse_at_plan_time(tmp_path):
    path = llama_folder(tmp_path, **SMALL)
    bad = {
        "quantized zero3": recipe(
            path, model={"lora": LORA_QV, "quantization": {"bits": 8}}, distributed={"strategy": "zero3"}
        ),
        "offload without zero": recipe(path, distributed={"strategy": "ddp", "offload": "cpu"}),
    }
    for name, r in bad.items():
        with pytest.raises(RecipeError) as info:
            make_plan(r, num_train_samples=128, procs_per_node=2)
        assert ("strategy ddp with 8-bit" if name == "quantized zero3" else "use zero2 or zero3 with offload") in str(
            info.value
        ), name


def test_offload_settings_beside_auto_are_warned_as_ignored(tmp_path):
    from launcher.planning.checks import ignored_settings

    r = recipe(llama_folder(tmp_path, **SMALL), distributed={"strategy": "auto", "offload": "cpu"})
    assert (
        "distributed.offload/offload_parameters are ignored with strategy: auto, which chooses the offload"
        in ignored_settings(r)
    )
    assert ignored_settings(recipe(llama_folder(tmp_path, **SMALL), distributed={"strategy": "auto"})) == []


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_dpo_counts_a_frozen_reference_copy_and_pairs_twice_the_activations(strategy, tmp_path):
    """Full fine-tuning DPO holds a frozen copy of the model in its load dtype (sharded like the weights under
    zero3/fsdp); with LoRA, or with a reference-free loss (orpo), there is none. A pair's chosen and rejected
    answers run as one batch: twice the activations, plus the reference pass's logits for DPO."""
    path = llama_folder(tmp_path, **SMALL)
    base = recipe(path, distributed={"strategy": strategy})
    shape = memory.model_shape(base)
    gpus = 4

    def estimate(task: dict, **model) -> memory.Estimate:
        r = recipe(path, model=model, distributed={"strategy": strategy})
        r = Recipe.model_validate({**r.model_dump(), "task": task})
        return memory.estimate(
            memory.model_shape(r), r, Choice(strategy), num_nodes=1, gpus_per_node=gpus, micro_batch=1
        )

    sft = memory.estimate(shape, base, Choice(strategy), num_nodes=1, gpus_per_node=gpus, micro_batch=1)
    dpo = estimate({"type": "preference", "loss": {"name": "dpo"}})
    orpo = estimate({"type": "preference", "loss": {"name": "orpo"}})
    shard = 1 if strategy == "ddp" else gpus
    assert dpo.parameters - sft.parameters == shape.num_params * 2 // shard  # bf16 weights
    assert orpo.parameters == sft.parameters and orpo.activations == 2 * sft.activations
    s, v = 512, SMALL["vocab_size"]
    assert dpo.activations == 2 * (sft.activations + s * v * (1 + 4))  # + the reference logits, 16-bit and fp32
    lora = estimate({"type": "preference", "loss": {"name": "dpo"}}, lora={"r": 8})
    lora_sft = memory.estimate(
        memory.model_shape(recipe(path, model={"lora": {"r": 8}}, distributed={"strategy": strategy})),
        recipe(path, model={"lora": {"r": 8}}, distributed={"strategy": strategy}),
        Choice(strategy), num_nodes=1, gpus_per_node=gpus, micro_batch=1,
    )  # fmt: skip
    assert lora.parameters == lora_sft.parameters  # the reference is the base, its adapter disabled


def test_background_checkpoints_asked_of_a_synchronous_strategy_are_warned_as_ignored(tmp_path):
    from launcher.planning.checks import ignored_settings

    def notes(strategy: str) -> list[str]:
        r = recipe(llama_folder(tmp_path, **SMALL), distributed={"strategy": strategy})
        return ignored_settings(r.model_copy(update={"train": r.train.model_copy(update={"checkpoint_async": True})}))

    assert any("train.checkpoint_async is ignored: zero3 saves synchronously" in n for n in notes("zero3"))
    assert notes("fsdp") == [] and ignored_settings(recipe(llama_folder(tmp_path, **SMALL))) == []


def test_4bit_base_is_sharded_but_not_its_constants(tmp_path):
    """zero3 and fsdp shard the packed 4-bit weights like any parameter; the quantization constants (absmax,
    double-quant state) are attributes of each layer and stay whole on every rank."""
    four = recipe(llama_folder(tmp_path, **SMALL), model={"lora": LORA_QV, "quantization": {"bits": 4}})
    shape = memory.model_shape(four)
    blocks = [-(-n // 64) for n in (64 * 64, 64 * 32, 64 * 32, 64 * 64, 64 * 128, 64 * 128, 128 * 64)]
    assert shape.quant_constant_bytes == 2 * sum(b + 4 * -(-b // 256) for b in blocks)  # two layers
    ddp = memory.estimate(shape, four, Choice("ddp"), num_nodes=1, gpus_per_node=4, micro_batch=1)
    for strategy in ("zero3", "fsdp"):
        est = memory.estimate(shape, four, Choice(strategy), num_nodes=1, gpus_per_node=4, micro_batch=1)
        adapters32 = shape.num_trainable * (2 if strategy == "zero3" else 4)  # fsdp keeps fp32 adapter shards
        gathered = 2 * shape.largest_layer_params
        expected = (adapters32 + shape.frozen_bytes - shape.quant_constant_bytes) // 4
        assert est.parameters == expected + shape.quant_constant_bytes + gathered, strategy
        assert est.parameters - gathered < ddp.parameters / 2  # 4 GPUs: a quarter, and the constants whole


def test_host_ram_at_load_per_strategy(tmp_path):
    """Every rank loads the weights, except under fsdp (rank 0 loads, the others hold their shards and the shard
    being received, in host memory on CPU ranks only) and zero3 without LoRA (zero.Init)."""
    from launcher.planning.host_memory import host_load_per_rank

    full = recipe(llama_folder(tmp_path, **SMALL))
    lora = recipe(llama_folder(tmp_path, **SMALL), model={"lora": LORA_QV})
    shape, whole = memory.model_shape(full), memory.model_shape(full).num_params * 2  # bf16
    assert host_load_per_rank(shape, full, "ddp", 4) == (whole, whole)
    assert host_load_per_rank(shape, full, "ddp", 4, "cpu") == (2 * whole, 2 * whole)  # + DDP's buckets
    assert host_load_per_rank(shape, full, "zero3", 4) == (whole, 0)
    assert host_load_per_rank(memory.model_shape(lora), lora, "zero3", 4)[1] > 0  # no zero.Init with LoRA
    assert host_load_per_rank(shape, full, "fsdp", 4) == (whole, 0)
    shard, largest = whole // 4, 64000 * 2
    assert host_load_per_rank(shape, full, "fsdp", 4, "cpu") == (whole + shard + largest, shard + largest // 4)
    est = memory.estimate(shape, full, Choice("fsdp"), num_nodes=1, gpus_per_node=4, micro_batch=1, device="cpu")
    assert est.host_load == whole + shard + largest + 3 * (shard + largest // 4)
    ddp = memory.estimate(shape, full, Choice("ddp"), num_nodes=2, gpus_per_node=4, micro_batch=1)
    assert ddp.host_load == 4 * whole


def test_background_checkpoints_stage_a_host_copy(tmp_path):
    """fsdp's background checkpoint write copies each rank's share of the states to host memory first."""
    from launcher.planning.host_memory import checkpoint_bytes

    r = recipe(llama_folder(tmp_path, **SMALL))
    shape = memory.model_shape(r)
    est = memory.estimate(shape, r, Choice("fsdp"), num_nodes=2, gpus_per_node=4, micro_batch=1)
    assert est.host_staging == checkpoint_bytes(shape, r) // 8 * 4
    sync = r.model_copy(update={"train": r.train.model_copy(update={"checkpoint_async": False})})
    assert memory.estimate(shape, sync, Choice("fsdp"), num_nodes=2, gpus_per_node=4, micro_batch=1).host_staging == 0
    assert memory.estimate(shape, r, Choice("zero3"), num_nodes=2, gpus_per_node=4, micro_batch=1).host_staging == 0
