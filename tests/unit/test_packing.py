"""Packing and length grouping (launcher.planning.packing, launcher.train.packing): bins, samplers, and that a
packed row trains exactly what the unpacked rows do, with no attention across a sequence boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.config.recipe import Recipe
from launcher.planning.packing import best_fit_decreasing, epoch_bins, packing_stats
from launcher.planning.plan import make_plan
from launcher.train.data import Collate
from launcher.train.packing import Batches, LengthGroupedSampler, PackedCollate, PackedSampler, block_causal_mask
from launcher.train.tasks import IGNORE, hooks


def sft_recipe(model: str, **data) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": model},
            "task": {"type": "causal_lm"},
            "data": {"train": "unused.jsonl", "prompt_field": "prompt", "response_field": "response", **data},
            "train": {"batch_size": 4},
            "output_dir": "unused",
        }
    )


PAIRS = [
    ("What is two plus two?", "two plus two is four."),
    ("Name a colour.", "Red."),
    ("Write the numbers from one to eight in words, please.", "one two three four five six seven eight"),
    ("Hi", "Hello there, how can I help you today?"),
    ("What is the capital of France?", "Paris is the capital of France."),
]


@pytest.fixture(scope="module")
def llama(tiny):
    from transformers import AutoModelForCausalLM

    recipe = sft_recipe(tiny["llama"], max_length=64)
    from launcher.train.model import load_tokenizer

    task = hooks(recipe, load_tokenizer(recipe))
    rows = [task.tokenize({"prompt": p, "response": r}) for p, r in PAIRS]
    models = {
        attn: AutoModelForCausalLM.from_pretrained(tiny["llama"], attn_implementation=attn, dtype=torch.float32).eval()
        for attn in ("sdpa", "eager")
    }
    return task, rows, models


# ----------------------------------------------------------------------------- bins
def test_best_fit_decreasing_places_every_row_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert max(lengths[b].sum() for b in bins) <= 128
    assert len(bins) <= np.ceil(11 / 9 * lengths.sum() / 128) + 1  # within BFD's bound of the optimum


def test_best_fit_decreasing_by_hand():
    # 7 → new bin (room 3); 6 → new bin (room 4); 4 → the fullest bin it fits: the second; 3 → the first; 2 → new
    assert best_fit_decreasing([4, 7, 3, 6, 2], 10) == [[1, 2], [3, 0], [4]]


def test_epoch_bins_are_seeded_and_keep_their_count_across_epochs():
    lengths = np.random.default_rng(1).integers(1, 40, size=300)
    assert epoch_bins(lengths, 64, seed=5, epoch=2) == epoch_bins(lengths, 64, seed=5, epoch=2)
    counts = {len(epoch_bins(lengths, 64, seed=5, epoch=e)) for e in range(4)}
    assert counts == {packing_stats(lengths, 64, seed=5).num_bins}  # the plan's count holds in every epoch
    assert epoch_bins(lengths, 64, 5, 0) != epoch_bins(lengths, 64, 5, 1)  # ties broken by the epoch's shuffle


def test_rows_longer_than_a_bin_are_refused():
    with pytest.raises(ValueError, match="1..8"):
        best_fit_decreasing([3, 9], 8)


# ----------------------------------------------------------------------------- samplers
def plan_for(recipe: Recipe, rows: int, world: int, lengths=None):
    return make_plan(recipe, num_train_samples=rows, procs_per_node=world, train_lengths=lengths)


def test_packed_sampler_steps_cover_each_epoch_and_resume_at_any_world_size(tiny):
    lengths = np.random.default_rng(2).integers(4, 30, size=200).tolist()
    weights = np.array(lengths, dtype=np.float64) - 1
    recipe = sft_recipe(tiny["llama"], max_length=64, packing="pack").model_copy()
    recipe.train.batch_size, recipe.train.micro_batch_size = 8, 2

    def step_rows(world: int, step: int) -> tuple[list, float]:
        plan = plan_for(recipe, 200, world, lengths)
        batches = Batches(PackedSampler(plan, 1234, weights, lengths, 64), "pack")
        parts = [batches(step, rank) for rank in range(world)]
        return sorted(tuple(g) for p in parts for micro in p.micro_batches for g in micro), parts[0].global_weight

    plan = plan_for(recipe, 200, 2, lengths)
    assert plan.num_train_bins == packing_stats(lengths, 64, 1234).num_bins
    assert plan.steps_per_epoch == plan.num_train_bins // 8
    for step in (0, 3, plan.steps_per_epoch + 1):  # the same bins, whatever the world size
        assert step_rows(1, step) == step_rows(2, step) == step_rows(4, step)
    groups, weight = step_rows(2, 0)
    assert weight == sum(weights[list(g)].sum() for g in groups)
    seen = [i for s in range(plan.steps_per_epoch) for g in step_rows(2, s)[0] for i in g]
    assert len(seen) == len(set(seen))  # an epoch trains every row at most once


def test_length_grouping_cuts_padding_and_keeps_the_epoch(tiny):
    lengths = np.random.default_rng(3).integers(2, 120, size=800)
    recipe = Recipe.model_validate(
        {
            "model": {"path": tiny["bert"]},
            "task": {"type": "sequence_classification", "num_labels": 2},
            "data": {"train": "unused.jsonl", "group_by_length": True},
            "train": {"batch_size": 16, "micro_batch_size": 4},
            "output_dir": "unused",
        }
    )
    plan = plan_for(recipe, 800, 2)
    grouped = LengthGroupedSampler(plan, 7, np.ones(800), lengths)
    order = grouped.order(0)
    assert sorted(order.tolist()) == list(range(800))
    assert (LengthGroupedSampler(plan, 7, np.ones(800), lengths).order(0) == order).all()  # seeded: resumable
    assert not (grouped.order(1) == order).all()

    def padding(sampler) -> float:
        padded = real = 0
        for step in range(plan.steps_per_epoch):
            for rank in range(2):
                for micro in sampler.batch(step, rank).micro_batches:
                    padded += len(micro) * lengths[micro].max()
                    real += lengths[micro].sum()
        return 1 - real / padded

    from launcher.train.data import Sampler

    assert padding(grouped) < 0.5 * padding(Sampler(plan, 7, np.ones(800)))


# ----------------------------------------------------------------------------- no cross-contamination
def per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The next-token loss at every trained position, in order."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    keep = targets != IGNORE
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="none")


def losses_and_grads(model, batch):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    losses = per_token(model(**inputs).logits, batch["labels"])
    losses.sum().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["pack", "padding_free"])
def test_packed_rows_train_exactly_what_the_unpacked_rows_do(llama, attn, layout):
    task, rows, models = llama
    model = models[attn]
    padded, padded_grads = losses_and_grads(model, Collate(task)(rows))
    groups = [[rows[0], rows[1], rows[2]], [rows[3], rows[4]]] if layout == "pack" else [rows]
    packed_batch = PackedCollate(task, attn)([[r for r in g] for g in groups])
    assert packed_batch["position_ids"][0, len(rows[0]["input_ids"])] == 0  # positions restart per sequence
    packed, packed_grads = losses_and_grads(model, packed_batch)
    assert packed.shape == padded.shape == (sum(r["weight"] for r in rows),)
    assert (packed - padded).abs().max() <= 1e-5
    assert max((packed_grads[n] - padded_grads[n]).abs().max().item() for n in padded_grads) <= 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_perturbing_one_packed_sequence_leaves_the_others_unchanged(llama, attn):
    task, rows, models = llama
    model = models[attn]
    collate = PackedCollate(task, attn)
    changed = dict(rows[1], input_ids=[(t * 7 + 3) % 1000 + 1000 for t in rows[1]["input_ids"]])
    ends = np.cumsum([0] + [len(r["input_ids"]) for r in rows[:3]])
    first, middle, last = (slice(ends[i], ends[i + 1]) for i in range(3))

    def logits(group, plain: bool = False) -> torch.Tensor:
        batch = collate([group])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if plain:  # the concatenation under plain causal attention (a 2D mask of ones: what packing must not do)
            inputs["attention_mask"] = torch.ones_like(batch["input_ids"])
        with torch.no_grad():
            return model(**inputs).logits[0]

    before, after = logits(rows[:3]), logits([rows[0], changed, rows[2]])
    assert (after[middle] - before[middle]).abs().max() > 1e-3  # the perturbed sequence did change
    for span in (first, last):
        assert (after[span] - before[span]).abs().max() <= 1e-6
    leaky = logits(rows[:3], plain=True), logits([rows[0], changed, rows[2]], plain=True)
    assert (leaky[1][last] - leaky[0][last]).abs().max() > 1e-3  # without the mask it leaks: the test can tell


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]), "sdpa")[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(mask, expected)
    eager = block_causal_mask(torch.tensor([[0, 1]]), "eager")[0, 0]
    assert eager[1, 1] == 0 and eager[1, 0] == torch.finfo(torch.float32).min


def test_flash_attention_layout_is_one_row_without_a_mask(llama):
    task, rows, _ = llama
    batch = PackedCollate(task, "flash_attention_2")([[rows[0], rows[1]], [rows[2]]])
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows[:3]))
    assert "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])]


@pytest.mark.gpu
def test_flash_attention_varlen_matches_unpacked_on_gpu(tiny):
    """On a GPU with flash-attn installed: the varlen path trains what the unpacked rows do (bf16 tolerance)."""
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    from launcher.train.model import load_tokenizer

    recipe = sft_recipe(tiny["llama"], max_length=64)
    task = hooks(recipe, load_tokenizer(recipe))
    rows = [task.tokenize({"prompt": p, "response": r}) for p, r in PAIRS]
    kwargs = {"dtype": torch.bfloat16, "device_map": {"": "cuda"}}
    flash = AutoModelForCausalLM.from_pretrained(tiny["llama"], attn_implementation="flash_attention_2", **kwargs)
    sdpa = AutoModelForCausalLM.from_pretrained(tiny["llama"], attn_implementation="sdpa", **kwargs)
    padded = {k: v.cuda() for k, v in Collate(task)(rows).items()}
    packed = {k: v.cuda() for k, v in PackedCollate(task, "flash_attention_2")([rows]).items()}
    with torch.no_grad():
        a = per_token(sdpa(**{k: v for k, v in padded.items() if k != "labels"}).logits, padded["labels"])
        b = per_token(flash(**{k: v for k, v in packed.items() if k != "labels"}).logits, packed["labels"])
    assert (a - b).abs().max() <= 2e-2
