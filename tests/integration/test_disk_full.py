"""A checkpoint write that runs out of disk (a real full file system: a 4 MiB tmpfs, where mounting one is
allowed): the error names the file system and its free space instead of torch's "[enforce fail at
inline_container.cc] unexpected pos", the partial temporary folder is removed, and the previous checkpoint is
intact. Accelerate's save_state writes the model and optimizer as a rank does (one process, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

SAVE = """
import sys
from pathlib import Path
import torch
from accelerate import Accelerator
from launcher.records import CheckpointState
from launcher.train import checkpoint
run = Path(sys.argv[1])
acc = Accelerator(cpu=True)
model = torch.nn.Linear(256, 256)
model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters()))
checkpoint.save(acc, run, 1, CheckpointState(step=1, world_size=1, fingerprint={}), keep_last=2)  # 0.28 MiB
import shutil
(run / "filler").write_bytes(b"x" * (shutil.disk_usage(run).free - 100 * 2**10))  # room for a third of one
try:
    checkpoint.save(acc, run, 2, CheckpointState(step=2, world_size=1, fingerprint={}), keep_last=2)
except checkpoint.CheckpointWriteFailed as exc:
    print("REFUSED", exc)
"""


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:100]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_during_a_checkpoint_write_is_said_and_cleaned_up(small_disk):
    run = small_disk / "run"
    run.mkdir()
    done = subprocess.run([sys.executable, "-c", SAVE, str(run)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next((line for line in done.stdout.splitlines() if line.startswith("REFUSED")), done.stdout + done.stderr)
    assert f"the checkpoint of step 2 could not be written to {run} (the disk is full; " in line, line
    assert (
        "MiB free of 4.0 MiB on that file system" in line
        and "the newest complete checkpoint, checkpoint-00000001, is intact" in line
    )
    assert "inline_container" not in line
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-00000001", "filler"], "the partial folder is gone"
