"""What a checkpoint's pickles may hold (launcher/train/unpickling.py): the static check before launch finds a
code-running payload wherever a pickle can sit (a raw pickle, a torch archive, one of the archives DCP
concatenates), passes the states the libraries really write, and is no looser than torch's own weights_only list;
on the ranks, the loaders the libraries call refuse the same payload instead of running it.

The payload writes a marker file: the first test shows it runs under a plain unpickler, the others that it
never does under ours. Real checkpoints of every strategy are refused with a planted payload in
tests/bad_inputs (DDP) and tests/integration/test_strategies.py (ZeRO-2, ZeRO-3, FSDP).
"""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.train.unpickling import (
    EXTRA,
    TORCH_FAMILIES,
    RestrictedUnpickler,
    allowed,
    dcp_reader,
    globals_named,
    safe_loading,
    unsafe_globals,
)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "payload-ran"


def test_the_payload_is_live_under_a_plain_unpickler(marker):
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
def test_a_payload_is_found_in_every_pickle_protocol(protocol, marker):
    """GLOBAL (protocols 0-3) and STACK_GLOBAL with memoised strings (4-5) name the same callable."""
    data = pickle.dumps({"state": [1, 2.0, "x"], "hook": Payload(marker)}, protocol=protocol)
    assert "posix.system" in globals_named(data) or "nt.system" in globals_named(data)
    assert not marker.exists()


def test_payloads_are_found_in_raw_pickles_archives_and_concatenated_archives(tmp_path, marker):
    folder = tmp_path / "checkpoint-00000004"
    folder.mkdir()
    with open(folder / "raw.metadata", "wb") as f:
        pickle.dump(Payload(marker), f, protocol=4)
    torch.save({"weight": torch.ones(2), "hook": Payload(marker)}, folder / "optimizer.bin")
    # DCP's .distcp: one torch archive per item, concatenated; the payload first, then last
    for name, items in {
        "first.distcp": [Payload(marker), torch.ones(3)],
        "last.distcp": [torch.ones(3), Payload(marker)],
    }.items():
        with open(folder / name, "wb") as f:
            for item in items:
                buffer = io.BytesIO()
                torch.save(item, buffer)
                f.write(buffer.getvalue())
    torch.save({"weight": torch.ones(2)}, folder / "clean.bin")
    (folder / "trainer_state.json").write_text('{"step": 4}')
    found = unsafe_globals(folder)
    named = {line.split(":")[0].split(" ")[0] for line in found}
    assert named == {"raw.metadata", "optimizer.bin", "first.distcp", "last.distcp"}, found
    assert all(line.endswith("names posix.system") for line in found), found
    assert not marker.exists()


def test_the_states_the_libraries_write_pass(tmp_path):
    """Accelerate's RNG state (numpy's arrays inside), a DeepSpeed loss scaler and ZeRO enum, and a DCP checkpoint
    (metadata and items) hold only allowed globals, and load under the rank-side loaders."""
    import torch.distributed.checkpoint as dcp
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "checkpoint-00000002"
    folder.mkdir()
    rng = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
           "torch_manual_seed": torch.get_rng_state()}  # fmt: skip
    torch.save(rng, folder / "random_states_0.pkl")
    deepspeed_state = {"loss_scaler": DynamicLossScaler(2**16, 100, 1, 2, False), "zero_stage": ZeroStageEnum.gradients}
    torch.save({**deepspeed_state, "state": torch.zeros(4)}, folder / "optim_states.pt")
    dcp.save({"model": {"w": torch.arange(6.0)}, "step": 7}, checkpoint_id=str(folder / "fsdp"))
    assert unsafe_globals(folder) == []
    with safe_loading():
        loaded = torch.load(folder / "random_states_0.pkl", weights_only=False)  # forced to weights_only
        assert torch.equal(loaded["torch_manual_seed"], rng["torch_manual_seed"])
        assert torch.load(folder / "optim_states.pt", weights_only=False)["zero_stage"] == ZeroStageEnum.gradients
        state = {"model": {"w": torch.zeros(6)}, "step": 0}
        dcp.load(state, storage_reader=dcp_reader(folder / "fsdp"))
    assert torch.equal(state["model"]["w"], torch.arange(6.0)) and state["step"] == 7


def test_the_loaders_the_ranks_use_refuse_a_payload(tmp_path, marker):
    """With the static check bypassed (a file swapped after it), what Accelerate, DeepSpeed and DCP call still
    refuses: Accelerate's custom-state load (accelerate.utils.load) and DeepSpeed's checkpoint engine ask torch.load
    for weights_only=False, which safe_loading overrides; DCP's metadata goes through RestrictedUnpickler."""
    from accelerate.utils import load as accelerate_load
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    torch.save({"last_epoch": 3, "hook": Payload(marker)}, tmp_path / "custom_checkpoint_0.pkl")
    with open(tmp_path / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)

    with safe_loading():
        with pytest.raises(pickle.UnpicklingError, match="system"):  # what load_custom_state calls
            accelerate_load(tmp_path / "custom_checkpoint_0.pkl", map_location="cpu", weights_only=False)
        with pytest.raises(pickle.UnpicklingError, match="system"):
            TorchCheckpointEngine().load(str(tmp_path / "custom_checkpoint_0.pkl"))
        with pytest.raises(pickle.UnpicklingError, match="system"):
            torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=False)
    with pytest.raises(pickle.UnpicklingError, match="not a state type"):
        dcp_reader(tmp_path).read_metadata()
    with open(tmp_path / ".metadata", "rb") as f, pytest.raises(pickle.UnpicklingError):
        RestrictedUnpickler(f).load()
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None, "the override is scoped to the block"


def test_the_allow_list_is_no_looser_than_torchs():
    """Every torch name the families admit is on torch's weights_only list, every name on that list is admitted,
    and the extras are the few state types named in README.md (no callable that runs what it is given)."""
    import importlib

    from torch._weights_only_unpickler import _get_allowed_globals

    torch_list = set(_get_allowed_globals())
    assert {name for name in torch_list if not allowed(*name.rsplit(".", 1))} == set()
    for module in ("torch", "torch.cuda", "torch.sparse", "torch._utils", "torch._tensor", "torch.serialization",
                   "torch.nn.parameter", "torch.storage"):  # fmt: skip
        admitted = {f"{module}.{n}" for n in dir(importlib.import_module(module))}
        admitted = {name for name in admitted if TORCH_FAMILIES.fullmatch(name)}
        assert admitted <= torch_list, sorted(admitted - torch_list)
    for dangerous in ("posix.system", "os.system", "builtins.eval", "builtins.exec", "builtins.getattr",
                      "builtins.__import__", "subprocess.Popen", "torch.load", "torch.save", "numpy.load",
                      "pickle.loads", "torch.jit.load", "functools.partial", "pathlib.Path"):  # fmt: skip
        assert not allowed(*dangerous.rsplit(".", 1)), dangerous
    assert sum(len(names) for names in EXTRA.values()) < 30
