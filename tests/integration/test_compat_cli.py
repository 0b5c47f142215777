"""A combination the compatibility rules refuse reaches the command line before anything starts (and an exact
equivalent is rewritten with a warning)."""

from __future__ import annotations

from helpers import RECIPES, launch


def test_refusal_reaches_the_command_line_before_anything_starts(tmp_path):
    qlora = (RECIPES / "llama-qlora-4bit.yaml", "--dry-run", f"output_dir={tmp_path}", "distributed.strategy=zero3")
    run = launch(*qlora, "model.quantization.bits=8")
    assert run.returncode == 2, run.output
    assert (
        "zero3 cannot shard an 8-bit base" in run.stderr and "use model.quantization.bits: 4 with zero3" in run.stderr
    )
    sharded = launch(*qlora)  # a 4-bit base is sharded as asked
    assert sharded.returncode == 0 and "warning" not in sharded.stderr, sharded.output
    rewritten = launch(
        RECIPES / "llama-qlora-4bit.yaml", "--dry-run", f"output_dir={tmp_path}", "distributed.strategy=zero2"
    )
    assert rewritten.returncode == 0 and "warning: distributed.strategy zero2 → ddp" in rewritten.stderr
