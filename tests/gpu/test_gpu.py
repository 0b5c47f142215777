"""GPU checks (skipped without CUDA): one process per local GPU on NCCL, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from helpers import RECIPES, launch, summary

pytestmark = pytest.mark.gpu


def test_quickstart_on_every_local_gpu(tmp_path):
    out = tmp_path / "run"
    run = launch(RECIPES / "quickstart.yaml", f"output_dir={out}", "train.precision=bf16", timeout=600)
    assert run.returncode == 0, run.output[-3000:]
    s = summary(out)
    assert s["world_size"] == torch.cuda.device_count()
    assert s["plan"]["device"] == "cuda" and s["backend"] == "nccl"
    assert s["metrics"]["test"]["accuracy"] >= 0.93


def test_auto_plans_with_the_memory_nvidia_smi_reports(tmp_path):
    """No gpu_memory anywhere: the local backend reads it from nvidia-smi, and auto picks what fits."""
    from launcher.backends.local import gpu_memory
    from launcher.planning.memory import gib

    dry = launch(
        RECIPES / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", "distributed.strategy=auto", "--dry-run"
    )
    assert dry.returncode == 0, dry.output[-3000:]
    words = "".join(dry.stdout.split())  # the plan table wraps its lines
    assert "auto:fastestthatfits" in words and "".join(gib(gpu_memory()).split()) in words


def test_qlora_under_fsdp_on_every_local_gpu(tiny, tmp_path):
    """4-bit base sharded by FSDP2 over the local GPUs (bf16 compute, packed weights stored in fp32 shards):
    trains, exports an adapter holding the trained values. bench/gpu.py runs the ~1B case."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    run = launch(
        RECIPES / "sft-causal-lm.yaml",
        f"model.path={tiny['llama']}",
        f"output_dir={out}",
        "distributed.strategy=fsdp",
        "train.precision=bf16",
        "model.lora.r=8",
        "model.quantization.bits=4",
        "train.max_steps=8",
        "train.save_every=4",
        timeout=900,
    )
    assert run.returncode == 0, run.output[-3000:]
    s = summary(out)
    assert s["world_size"] == torch.cuda.device_count() and s["sharded"] == "parameters"
    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    for name, norm in s["adapter_norms"].items():
        assert saved[name.replace(".default", "")].float().norm().item() == pytest.approx(norm, rel=1e-3), name
