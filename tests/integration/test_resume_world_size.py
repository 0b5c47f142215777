"""Resume a checkpoint on another number of processes or nodes (issue 6, item 3), through the `launch` command.

The recipe's batch is global and the sampler is stateless, so a run resumed on W' processes from a checkpoint
written by W must end with the weights of the uninterrupted run (fp32, no dropout: equal up to float summation
order). This module is `slow` (make test-all). The default suite covers the same ground in runs it makes anyway:
tests/test_strategies.py resumes ZeRO-2 and FSDP 2→1 and checks the refusals that remain, and
tests/test_slurm_jobs.py finishes a 2-node job's checkpoint with a 1-node job.
Slow: ZeRO-2 2→1 (an uninterrupted 2-rank run, checkpoints at steps 2, 4, 6, is the reference; its step-2
checkpoint resumed on 1 rank: the optimizer partitions resharded through DeepSpeed's universal checkpoint),
1→2 (that 1-rank run's own step-4 checkpoint resumed on 2 ranks), DDP 2→1 and 1→2 on local
processes, LoRA, ZeRO-3 (also with LoRA) and FSDP 2→1, and a dropout run resumed 1→2 twice (the ranks the
checkpoint had no random state for are seeded from (seed, step, rank): reproducible).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import RECIPES, launch, summary

SFT = RECIPES / "sft-causal-lm.yaml"
TOLERANCE = 1e-5


def sft_args(model: str, out: Path, *extra: str) -> list:
    """6 steps of a global batch of 8 (micro-batch 2: 2 ranks × 2 accumulation, or 1 rank × 4); checkpoints at
    steps 2, 4 and 6."""
    return [
        SFT,
        f"model.path={model}",
        f"output_dir={out}",
        "train.precision=fp32",
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_last=3",
        "train.optimizer.lr=1e-3",
        "train.log_every=1",
        "train.eval_every=null",
        *extra,
    ]


def truncated_copy(src: Path, dst: Path, step: int) -> Path:
    """`src` as it was right after the checkpoint of `step`: later checkpoints, export and summary gone."""
    shutil.copytree(src, dst)
    for folder in dst.glob("checkpoint-*"):
        if int(folder.name.split("-")[-1]) > step:
            shutil.rmtree(folder)
    shutil.rmtree(dst / "final", ignore_errors=True)
    (dst / "summary.json").unlink(missing_ok=True)
    return dst


def max_difference(a: Path, b: Path, file: str = "model.safetensors") -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a / "final" / file)), load_file(str(b / "final" / file))
    assert x.keys() == y.keys() and x
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def assert_resumed(run: Path, result, *, step: int, written_by: int, world_size: int) -> None:
    assert result.returncode == 0, result.output[-4000:]
    s = summary(run)
    assert s["resumed_from"].endswith(f"checkpoint-{step:08d}") and s["steps_this_launch"] == 6 - step
    assert s["resumed_world_size"] == written_by and s["world_size"] == world_size
    assert f"checkpoint written by {written_by} processes, resuming on {world_size}" in result.output


def two_to_one(model: str, root: Path, *extra: str) -> dict:
    """The uninterrupted 2-rank run (the reference) and its step-2 checkpoint resumed on 1 rank."""
    out = {
        "root": root,
        "extra": extra,
        "ref": launch(*sft_args(model, root / "ref", *extra), "--procs", "2", timeout=600),
    }
    assert out["ref"].returncode == 0, out["ref"].output[-4000:]
    out["2to1"] = launch(
        *sft_args(model, truncated_copy(root / "ref", root / "2to1", 2), *extra), "--procs", "1", timeout=600
    )
    return out


def check_two_to_one(runs: dict) -> None:
    root = runs["root"]
    assert_resumed(root / "2to1", runs["2to1"], step=2, written_by=2, world_size=1)
    assert summary(root / "2to1")["plan"]["grad_accum"] == 4  # the same global batch in 4 micro-batches
    assert max_difference(root / "ref", root / "2to1") <= TOLERANCE


def check_one_to_two(model: str, runs: dict):
    """The 1-rank run's own step-4 checkpoint resumed on 2 ranks ends with the reference's weights too."""
    root = runs["root"]
    two = truncated_copy(root / "2to1", root / "1to2", 4)
    resumed = launch(*sft_args(model, two, *runs["extra"]), "--procs", "2", timeout=600)
    assert_resumed(two, resumed, step=4, written_by=1, world_size=2)
    assert "rank 1: seeded from (seed, step, rank)" in resumed.output  # rank 1 had no saved RNG state
    assert max_difference(root / "ref", two) <= TOLERANCE
    return resumed


@pytest.fixture(scope="module")
def zero2(tiny, tmp_path_factory) -> dict:
    return two_to_one(tiny["llama"], tmp_path_factory.mktemp("resume-zero2"), "distributed.strategy=zero2")


@pytest.mark.slow
def test_zero2_two_ranks_resume_on_one(zero2):
    """ZeRO-2 shards the Adam states by rank: resumed on 1 rank, they are resharded and the run still ends with
    the reference's weights."""
    check_two_to_one(zero2)
    assert "resharding the ZeRO states of checkpoint-00000002 for 1 processes" in zero2["2to1"].output
    assert not list((zero2["root"] / "2to1").glob(".universal-*")), "the converted states are removed once loaded"


@pytest.mark.slow
def test_zero2_one_rank_resumes_on_two(zero2, tiny):
    resumed = check_one_to_two(tiny["llama"], zero2)
    assert "resharding the ZeRO states of checkpoint-00000004 for 2 processes" in resumed.output


@pytest.mark.slow
def test_ddp_resumes_two_ranks_on_one_and_one_on_two(tiny, tmp_path):
    runs = two_to_one(tiny["llama"], tmp_path)
    check_two_to_one(runs)
    check_one_to_two(tiny["llama"], runs)


SLOW_CASES = {  # name: (extra recipe settings, processes that write the step-2 checkpoint, processes that resume)
    "lora-2to1": (["model.lora.r=8", "model.lora.dropout=0"], 2, 1),
    "zero3-2to1": (["distributed.strategy=zero3"], 2, 1),
    "lora-zero3-2to1": (["model.lora.r=8", "model.lora.dropout=0", "distributed.strategy=zero3"], 2, 1),
    "fsdp-2to1": (["distributed.strategy=fsdp"], 2, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_resume_on_another_world_size(name, tiny, tmp_path):
    extra, writers, resumers = SLOW_CASES[name]
    model = tiny["llama"]
    ref = launch(*sft_args(model, tmp_path / "ref", *extra), "--procs", str(writers), timeout=600)
    assert ref.returncode == 0, ref.output[-4000:]
    run = truncated_copy(tmp_path / "ref", tmp_path / "run", 2)
    resumed = launch(*sft_args(model, run, *extra), "--procs", str(resumers), timeout=600)
    assert_resumed(run, resumed, step=2, written_by=writers, world_size=resumers)
    file = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    assert max_difference(tmp_path / "ref", run, file) <= TOLERANCE


@pytest.mark.slow
def test_ranks_without_a_saved_random_state_are_seeded_reproducibly(tiny, tmp_path):
    """Dropout on: a 1-rank checkpoint resumed twice on 2 ranks gives the same weights both times."""
    args = [
        "data.max_length=32",
        "train.batch_size=8",
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.save_every=2",
        "train.optimizer.lr=1e-3",
        "train.eval_every=null",
        "data.test=null",
    ]
    quickstart = RECIPES / "quickstart.yaml"
    model = tiny["bert_dropout"]
    ref = launch(quickstart, f"model.path={model}", f"output_dir={tmp_path / 'ref'}", *args, "--procs", "1")
    assert ref.returncode == 0, ref.output[-4000:]
    for again in ("a", "b"):
        run = truncated_copy(tmp_path / "ref", tmp_path / again, 2)
        resumed = launch(quickstart, f"model.path={model}", f"output_dir={run}", *args, "--procs", "2")
        assert resumed.returncode == 0 and "rank 1: seeded from (seed, step, rank)" in resumed.output
    assert max_difference(tmp_path / "a", tmp_path / "b") == 0.0
    assert max_difference(tmp_path / "ref", tmp_path / "a") > 0.0  # dropout masks differ from the 1-rank run's
