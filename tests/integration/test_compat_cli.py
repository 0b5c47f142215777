"""A combination the compatibility rules refuse reaches the command line before anything starts (and an exact
equivalent is rewritten with a warning)."""

from __future__ import annotations

from helpers import RECIPES, launch


def test_refusal_reaches_the_command_line_before_anything_starts(tmp_path):
    run = launch(RECIPES / "llama-qlora-4bit.yaml", "--dry-run", f"output_dir={tmp_path}", "distributed.strategy=zero3")
    assert run.returncode == 2, run.output
    assert "zero3 shards parameters and cannot shard bitsandbytes 4-bit weights; use strategy ddp" in run.stderr
    rewritten = launch(
        RECIPES / "llama-qlora-4bit.yaml", "--dry-run", f"output_dir={tmp_path}", "distributed.strategy=zero2"
    )
    assert rewritten.returncode == 0 and "warning: distributed.strategy zero2 → ddp" in rewritten.stderr
