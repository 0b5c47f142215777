"""LoRA, DoRA, 8-bit LoRA and 4-bit QLoRA sharded by ZeRO-3 and by FSDP2: real training through `launch`, save,
reload in this process, merge, resume.

The adapter is checked against the values the ranks trained (their per-tensor
norms, summed from the shards each rank held): the known failure of other
tools under ZeRO-3 is an adapter file that is saved but empty or untrained.
The 4-bit base is sharded too (its packed weights, stored in the shards' dtype);
under fsdp rank 1 never reads the weights (it builds on meta and receives its
shards) and its checkpoints are written in the background.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import RECIPES, launch, summary

SFT = RECIPES / "sft-causal-lm.yaml"
QUICKSTART = RECIPES / "quickstart.yaml"
SHORT = [
    "data.max_length=32",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.max_steps=8",
    "train.log_every=1",
    "train.precision=fp32",
]
QLORA = [
    "model.lora.r=8",
    "train.optimizer.lr=1e-2",
    "model.quantization.bits=4",
    "model.quantization.compute_dtype=fp32",
    "train.save_every=4",
]
CASES = {
    # name: (model, recipe, procs, overrides)
    "4bit-zero3": ("llama64", SFT, 2, [*QLORA, "distributed.strategy=zero3"]),
    "dora-classifier": (
        "bert",
        QUICKSTART,
        1,
        [
            "model.lora.r=4",
            "model.lora.use_dora=true",
            "train.optimizer.lr=1e-2",
            "model.lora.target_modules=[query,value]",
        ],
    ),
    "8bit": ("llama64", SFT, 1, ["model.lora.r=8", "train.optimizer.lr=1e-2", "model.quantization.bits=8"]),
    "4bit-fsdp": ("llama64", SFT, 2, [*QLORA, "distributed.strategy=fsdp"]),
}
RESUMED = ("4bit-zero3", "4bit-fsdp")  # their checkpoints hold the adapters' states (and fsdp's the 4-bit shards)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, str]:
    """The tiny models, plus a Llama 64 wide: bitsandbytes' CPU 4-bit kernel packs 64-element blocks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny["llama"])
    folder = tmp_path_factory.mktemp("llama64")
    torch.manual_seed(0)
    config = LlamaConfig.from_pretrained(
        tiny["llama"], hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {**tiny, "llama64": str(folder)}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    tiny = models
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for name, (model, recipe, procs, extra) in CASES.items():
        run_dir = root / name
        trained = launch(
            recipe,
            f"model.path={tiny[model]}",
            f"output_dir={run_dir}",
            *SHORT,
            *extra,
            "--procs",
            str(procs),
            timeout=600,
        )
        merged = launch("export", run_dir, "--merge") if trained.returncode == 0 else None
        out[name] = (run_dir, trained, merged)
    return out


@pytest.fixture(scope="module")
def resumed(runs, models):
    """The sharded QLoRA runs resumed from step 4 of a copy that lost everything after it (slow: two more
    2-rank launches)."""
    out = {}
    for name in RESUMED:
        run_dir = runs[name][0]
        again = run_dir.with_name(f"{name}-resumed")
        if runs[name][1].returncode == 0:
            shutil.copytree(run_dir, again)
            for gone in ("checkpoint-00000008", "final", "merged"):
                shutil.rmtree(again / gone)
            (again / "summary.json").unlink()
            model, recipe, procs, extra = CASES[name]
            out[name] = launch(
                recipe,
                f"model.path={models[model]}",
                f"output_dir={again}",
                *SHORT,
                *extra,
                "--procs",
                str(procs),
                timeout=600,
            )
    return out


def _saved_name(param_name: str) -> str:
    """peft drops the adapter name from saved keys; a trained head is saved under its own name."""
    name = param_name.replace(".modules_to_save.default", "").replace(
        ".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"
    )
    return name.replace(".default", "")


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_trains_and_saves_what_was_trained(runs, name):
    from safetensors.torch import load_file

    run_dir, trained, _ = runs[name]
    assert trained.returncode == 0, trained.output[-3000:]
    s = summary(run_dir)
    assert s["train_loss"]["last"] < s["train_loss"]["first"] - 0.05
    saved = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    norms = s["adapter_norms"]
    lora_b = [n for n in norms if "lora_B" in n]
    assert lora_b and all(norms[n] > 0 for n in lora_b)  # lora_B starts at zero: non-zero means trained
    for param, norm in norms.items():
        tensor = saved[_saved_name(param)]
        assert tensor.numel() > 0
        assert tensor.float().norm().item() == pytest.approx(norm, rel=1e-4, abs=1e-6), param
        if "lora_A" in param:
            assert 8 in tensor.shape or 4 in tensor.shape  # the rank r
    if name == "dora-classifier":
        assert any("magnitude" in n for n in norms) and any(n.startswith("base_model.model.classifier") for n in saved)
    if name in ("8bit", "4bit-zero3", "4bit-fsdp"):
        assert s["world_size"] == CASES[name][2]
    if name in ("4bit-zero3", "4bit-fsdp"):  # the frozen 4-bit base is sharded with the adapters
        assert s["sharded"] == "parameters"
        (local0, whole0), (local1, whole1) = s["held_per_rank"]
        assert whole0 == whole1 and 0.45 * whole0 <= local0 <= 0.55 * whole0 and local0 + local1 == whole0


@pytest.mark.parametrize("name", list(CASES))
def test_merged_weights_give_the_adapter_logits(runs, name):
    """`launch export --merge` writes a plain model whose logits equal base + adapter reloaded with peft."""
    import transformers as tf
    from peft import PeftModel

    run_dir, trained, merged = runs[name]
    assert trained.returncode == 0, trained.output[-3000:]
    assert merged is not None and merged.returncode == 0, merged.output[-3000:]
    model_name, recipe, _, _ = CASES[name]
    auto = tf.AutoModelForCausalLM if recipe == SFT else tf.AutoModelForSequenceClassification
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = auto.from_pretrained(str(run_dir / "merged")).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        base_path = _base_path(run_dir)
        base = auto.from_pretrained(base_path, **({"num_labels": 2} if recipe == QUICKSTART else {}))
        want = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def _base_path(run_dir) -> str:
    import yaml

    return yaml.safe_load((run_dir / "launch" / "recipe.yaml").read_text())["model"]["path"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_sharded_qlora_resumes_to_the_same_adapter(runs, resumed, name):
    from safetensors.torch import load_file

    resumed = resumed[name]
    assert resumed.returncode == 0, resumed.output[-3000:]
    run_dir = runs[name][0]
    again = run_dir.with_name(f"{name}-resumed")
    assert summary(again)["resumed_from"].endswith("checkpoint-00000004")
    a = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(again / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_of_a_lora_runs_adapter_gives_the_runs_metrics(runs, models):
    """`launch eval --model final/` of a LoRA run: its adapter (and trained head) loaded onto the base, and
    the validation and test metrics the run reported at its end."""
    run_dir, trained, _ = runs["dora-classifier"]
    assert trained.returncode == 0, trained.output[-3000:]
    model, recipe, procs, extra = CASES["dora-classifier"]
    args = [recipe, f"model.path={models[model]}", f"output_dir={run_dir}", *SHORT, *extra]
    run = launch("eval", *args, "--model", run_dir / "final", "--procs", str(procs), timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    assert "with the adapter" in " ".join(run.stdout.replace("│", " ").split())
    got, want = summary(run_dir / "eval" / "final")["metrics"], summary(run_dir)["metrics"]
    assert got.keys() == want.keys() == {"validation", "test"}
    for split in want:
        numbers = {k: v for k, v in want[split].items() if isinstance(v, float)}
        assert {k: got[split][k] for k in numbers} == pytest.approx(numbers, rel=1e-5), split
