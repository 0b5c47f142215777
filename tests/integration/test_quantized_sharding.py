"""Why an 8-bit base stays refused under zero3 and fsdp, and why a 4-bit one is stored in the shards' dtype: the
facts behind planning/compat.py's EIGHT_BIT and Engine.quant_storage, measured by a real ZeRO-3 and FSDP2 on
bitsandbytes layers (quantized_sharding_probe.py, one process). When bitsandbytes changes, this test says
which rule to revisit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.planning.compat import EIGHT_BIT

PROBE = Path(__file__).with_name("quantized_sharding_probe.py")


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path_factory.mktemp("probe"))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fsdp_loses_the_8bit_matrix(facts):
    """fully_shard swaps the Int8Params for a plain sharded parameter: its CB/SCB are gone, the forward fails."""
    assert facts["fsdp_8bit_forward"].startswith("AttributeError") and "'CB'" in facts["fsdp_8bit_forward"]
    assert "Int8Params.CB" in EIGHT_BIT["fsdp"] and "forward fails" in EIGHT_BIT["fsdp"]


def test_zero3_leaves_the_whole_8bit_matrix_on_every_rank(facts):
    """ZeRO-3 frees the parameter's data (its partition lives in ds_tensor), but bitsandbytes' CB still holds
    the whole int8 matrix: nothing is saved by sharding it."""
    held = facts["zero3_8bit"]
    assert held["data"] == 0 and held["partition"] <= held["whole"]
    assert held["CB"] == held["whole"] > 0
    assert "CB attribute" in EIGHT_BIT["zero3"] and "does not partition" in EIGHT_BIT["zero3"]


def test_4bit_weights_must_be_stored_in_the_dtype_zero3_casts_to(facts):
    """Under bf16 ZeRO-3 casts the packed weights: stored in float32 they break, stored in bf16 they run."""
    assert facts["zero3_bf16_4bit_stored_in_float32"].startswith("RuntimeError")
    assert facts["zero3_bf16_4bit_stored_in_bfloat16"] == "ok"
