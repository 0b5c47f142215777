"""ZeRO-2, ZeRO-3 (+ CPU offload) and FSDP2 on 2 real gloo ranks through the `launch` command.

Each strategy trains the tiny Llama on the chat SFT data exactly as a 1-process
DDP run does (same global batch, fp32), so its consolidated export must give
that run's logits; the parameters (or, for ZeRO-2, the optimizer partitions)
must really be split between the ranks; and a run resumed from the middle
checkpoint must end with identical parameters, on the same 2 ranks or on 1 (issue 6: resume at any
world size; tests/test_resume_world_size.py has the other directions).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import RECIPES, final_weights, launch, summary

from launcher import cli

SFT = RECIPES / "sft-causal-lm.yaml"
STRATEGIES = {
    "zero2": ["distributed.strategy=zero2"],
    "zero3": ["distributed.strategy=zero3"],
    "zero3-offload": ["distributed.strategy=zero3", "distributed.offload=cpu", "distributed.offload_parameters=true"],
    "fsdp": ["distributed.strategy=fsdp", "distributed.activation_checkpointing=true"],
}
# zero3-offload checkpoints through the same DeepSpeed path as zero3. Resumed on how many ranks: zero3 on the
# same 2 (bit-identical), zero2 and fsdp on 1 (their partitions resharded; equal up to float summation order).
RESUMED = {"zero2": 1, "zero3": 2, "fsdp": 1}
SHARDED = {"zero2": "optimizer states", "zero3": "parameters", "zero3-offload": "parameters", "fsdp": "parameters"}


def sft_args(model: str, out, *extra: str) -> list:
    """6 steps of 2 ranks × 2 micro-batches × 2 accumulation; a checkpoint at step 3."""
    return [
        SFT,
        f"model.path={model}",
        f"output_dir={out}",
        "train.precision=fp32",
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.save_every=3",
        "train.optimizer.lr=1e-3",
        "train.log_every=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    out = {"ddp": launch(*sft_args(tiny["llama"], root / "ddp"), "--procs", "1", timeout=600)}
    for name, extra in STRATEGIES.items():
        out[name] = launch(*sft_args(tiny["llama"], root / name, *extra), "--procs", "2", timeout=600)
        if name in RESUMED and out[name].returncode == 0:
            # the same launch again in a copy that lost everything after the step-3 checkpoint
            again = root / f"{name}-resumed"
            shutil.copytree(root / name, again)
            for gone in ("checkpoint-00000006", "final"):
                shutil.rmtree(again / gone)
            (again / "summary.json").unlink()
            out[f"{name}-resumed"] = launch(
                *sft_args(tiny["llama"], again, *extra), "--procs", str(RESUMED[name]), timeout=600
            )
    return root, out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_shards_and_learns(runs, name):
    root, out = runs
    assert out[name].returncode == 0, out[name].output[-3000:]
    s = summary(root / name)
    assert s["world_size"] == 2 and s["backend"] == "gloo" and s["sharded"] == SHARDED[name]
    assert s["strategy"].startswith(name.split("-")[0])
    (local0, whole0), (local1, whole1) = s["held_per_rank"]
    assert whole0 == whole1 > 900_000
    for local in (local0, local1):
        assert 0.45 * whole0 <= local <= 0.55 * whole0, s["held_per_rank"]
    assert s["train_loss"]["last"] < s["train_loss"]["first"] - 0.2


def _logits(folder, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_export_is_the_trained_model(runs, name):
    """The consolidated export loads with from_pretrained and gives the 1-process DDP run's logits."""
    root, out = runs
    assert out["ddp"].returncode == 0 and out[name].returncode == 0, out[name].output[-3000:]
    ref, got = final_weights(root / "ddp"), final_weights(root / name)
    assert ref.keys() == got.keys()
    moved = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert moved < 1e-4, f"{name} weights differ from DDP's by {moved}"
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = _logits(root / "ddp" / "final", ids), _logits(root / name / "final", ids)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_gives_identical_parameters(runs, name):
    root, out = runs
    resumed = out[f"{name}-resumed"]
    assert resumed.returncode == 0, resumed.output[-3000:]
    s = summary(root / f"{name}-resumed")
    assert s["resumed_from"].endswith("checkpoint-00000003") and s["steps_this_launch"] == 3
    assert s["world_size"] == RESUMED[name] and s["resumed_world_size"] == 2
    a, b = final_weights(root / name), final_weights(root / f"{name}-resumed")
    if RESUMED[name] == 2:
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_resume_refusals_come_before_any_rank_starts(runs, tiny, tmp_path):
    """What cannot resume is refused at plan time (exit 2, the field named, what would work); another world
    size that the batch arithmetic allows is shown in the plan."""
    root, out = runs
    assert out["zero2"].returncode == 0, out["zero2"].output[-3000:]
    run = tmp_path / "run"
    shutil.copytree(root / "zero2", run, ignore=shutil.ignore_patterns("checkpoint-00000006", "final", "summary.json"))
    model = tiny["llama"]
    other = launch(*sft_args(model, run), "--procs", "2", "--dry-run")  # `auto` plans ddp on CPU
    assert other.returncode == 2 and "train.resume" in other.stderr
    assert "holds zero2 states but this launch plans ddp" in other.stderr
    assert "set distributed.strategy=zero2" in other.stderr
    zero2_args = sft_args(model, run, *STRATEGIES["zero2"])
    # 8 rows per step cannot be split into micro-batches of 2 over 3 processes
    three = launch(*zero2_args, "--procs", "3", "--dry-run")
    assert three.returncode == 2 and "train.batch_size" in three.stderr and "world size 3" in three.stderr
    four = launch(*zero2_args, "--procs", "4", "--dry-run")
    words = "".join(c for c in four.stdout if c.isalnum())  # the plan table wraps the line
    assert four.returncode == 0 and "checkpointwrittenby2processesresumingon4" in words


def test_export_command_on_full_weight_runs(runs, tmp_path):
    root, _ = runs
    full = launch("export", root / "zero3", "--merge")
    assert full.returncode == 0 and "holds the full weights (nothing to merge: not a LoRA run)" in full.stdout
    missing = launch("export", tmp_path / "nowhere")
    assert missing.returncode == 2 and "has not finished" in missing.stderr


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """A payload where a pickle was, as an attacker with write access would put it: a raw pickle for a raw one,
    a torch archive for an archive; DCP's concatenated item files get one more archive at their end."""
    if path.read_bytes()[:1] == b"\x80":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif path.suffix == ".distcp":
        buffer = io.BytesIO()
        torch.save({"state": Payload(marker)}, buffer)
        with open(path, "ab") as f:
            f.write(buffer.getvalue())
    else:
        torch.save({"state": Payload(marker)}, path)


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_a_payload_in_any_pickle_of_a_checkpoint_is_refused_and_never_runs(runs, name, tiny, tmp_path):
    """Every file of the strategy's newest checkpoint that holds a pickle (model and optimizer states, ZeRO
    shards, DCP metadata and item files, RNG states) gets a payload in turn, its manifest rewritten to match: the
    launch is refused with exit 2 naming the file and the callable, and the payload never runs."""
    from launcher.train.checkpoint import MANIFEST_FILE, complete, write_manifest
    from launcher.train.unpickling import pickles_in

    root, out = runs
    assert out[name].returncode == 0, out[name].output[-3000:]
    newest = complete(root / name)[-1]
    holders = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file() and any(pickles_in(p)))
    assert len(holders) >= 2, holders  # ddp on 1 rank: optimizer.bin, random_states_0.pkl
    marker = tmp_path / "payload-ran"
    extra = STRATEGIES.get(name, [])
    for relative in holders:
        run = tmp_path / f"{name}-{relative.as_posix().replace('/', '_')}"
        shutil.copytree(root / name, run, ignore=shutil.ignore_patterns("final", "summary.json"))
        folder = run / newest.name
        plant(folder / relative, marker)
        write_manifest(folder, hash_files="sha256" in (newest / MANIFEST_FILE).read_text())
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([str(a) for a in sft_args(tiny["llama"], run, *extra)] + ["--procs", "2"])
        assert code == 2, err.getvalue()[-2000:]
        assert f"{relative.name}" in err.getvalue() and "names posix.system" in err.getvalue(), err.getvalue()
    assert not marker.exists()
