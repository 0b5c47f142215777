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
