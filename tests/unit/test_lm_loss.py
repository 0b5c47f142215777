"""The chunked causal-LM loss (launcher.train.lm_loss) against the full one: same value, same gradients; and
regional torch.compile (launcher.train.model.compile_blocks) against eager."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from launcher.config.losses import CrossEntropy
from launcher.config.recipe import Recipe
from launcher.config.tasks import TASKS
from launcher.train.data import Collate
from launcher.train.lm_loss import HeadInput, lm_loss
from launcher.train.losses import LossContext, build_loss
from launcher.train.model import compile_blocks, load_tokenizer
from launcher.train.tasks import hooks

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a short one",
    "packing and chunking are about not computing what nobody trains on",
    "hello",
]


@pytest.fixture(scope="module")
def setup(tiny):
    from transformers import AutoModelForCausalLM

    recipe = Recipe.model_validate(
        {
            "model": {"path": tiny["llama"]},
            "task": {"type": "causal_lm"},
            "data": {"train": "unused.jsonl", "max_length": 32},
            "output_dir": "unused",
        }
    )
    task = hooks(recipe, load_tokenizer(recipe))
    batch = Collate(task)([task.tokenize({"text": t}) for t in TEXTS])
    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    return task, batch, model


def grads_of(model, loss: torch.Tensor) -> dict:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [5, 1024])
def test_chunked_loss_has_the_full_loss_value_and_gradients(setup, smoothing, chunk):
    task, batch, model = setup
    loss_fn = build_loss(CrossEntropy(name="cross_entropy", label_smoothing=smoothing), LossContext(TASKS["causal_lm"]))
    inputs = task.model_inputs(model, batch)
    full = loss_fn(model(**inputs).logits, batch["labels"])
    full_grads = grads_of(model, full)
    chunked = lm_loss(model, inputs, batch["labels"], loss_fn, "chunked", chunk)
    chunked_grads = grads_of(model, chunked)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert full_grads.keys() == chunked_grads.keys()
    assert max((full_grads[n] - chunked_grads[n]).abs().max().item() for n in full_grads) <= 1e-5  # fp32 sums


def test_the_head_computes_no_logits_under_the_chunked_loss(setup):
    _, batch, model = setup
    head = model.get_output_embeddings()
    with HeadInput(head) as seen:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape[1] == 0  # the [batch, seq, vocab] logits were never made
    assert seen.hidden.shape == (*batch["input_ids"].shape, model.config.hidden_size)


def test_a_head_that_is_not_a_plain_linear_is_refused():
    with pytest.raises(TypeError, match="lm_loss=full"):
        HeadInput(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_task_hooks_use_the_plans_loss(setup):
    """CausalLM.loss follows plan.lm_loss: chunked and full give the task's summed loss alike."""
    task, batch, model = setup
    loss_fn = build_loss(CrossEntropy(name="cross_entropy"), LossContext(TASKS["causal_lm"]))
    chunked_task = copy.copy(task)
    chunked_task.lm_loss, chunked_task.lm_loss_chunk = "chunked", 7
    with torch.no_grad():
        full = task.loss(model, batch, loss_fn)
        assert chunked_task.loss(model, batch, loss_fn).item() == pytest.approx(full.item(), rel=1e-6)
        assert chunked_task.evaluate(model, batch, loss_fn)[0] == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.slow  # 40 s of inductor compilation on 2 cores; the default suite checks the plan-time refusals
def test_regional_compile_matches_eager_for_a_few_steps(tiny):
    """train.compile on CPU (inductor): three AdamW steps of the tiny Llama, compiled per block, equal eager's."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("inductor on CPU needs a C++ compiler; the plan refuses train.compile without one")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 1000, (2, 16))

    def train(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
        if compiled:
            assert compile_blocks(model) == model.config.num_hidden_layers
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    eager, compiled = train(False), train(True)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


def test_no_tensor_of_the_logits_size_is_kept_for_backward(setup):
    """What autograd keeps for backward: the full loss keeps [batch, seq, vocab] logits, the chunked one nothing
    larger than one chunk of them."""
    task, batch, model = setup
    loss_fn = build_loss(CrossEntropy(name="cross_entropy"), LossContext(TASKS["causal_lm"]))
    inputs = task.model_inputs(model, batch)
    logits_size = batch["input_ids"].numel() * model.config.vocab_size

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def largest_saved(compute) -> int:
        sizes = [0]

        def keep(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            compute()
        return max(sizes)

    assert largest_saved(lambda: loss_fn(model(**inputs).logits, batch["labels"])) >= logits_size
    chunk = 8
    chunked = largest_saved(lambda: lm_loss(model, inputs, batch["labels"], loss_fn, "chunked", chunk))
    assert chunked <= chunk * model.config.vocab_size < logits_size / 4


def lm_recipe(model: str, **train) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": model},
            "task": {"type": "causal_lm"},
            "data": {"train": "unused.jsonl", "max_length": 128},
            "train": train,
            "output_dir": "unused",
        }
    )


def test_the_planner_counts_one_chunk_of_logits(tiny):
    """fp32: 12 bytes per logit (the logits, their upcast and gradient: planning/memory.py), micro-batch 4 × 128."""
    from launcher.planning import memory

    shape = memory.model_shape(lm_recipe(tiny["llama"]))

    def head_bytes(strategy: str, chunk: int) -> int:
        r = lm_recipe(tiny["llama"], lm_loss_chunk=chunk)
        no_head = r.model_copy(update={"task": r.task.model_copy(update={"type": "sequence_classification"})})
        return memory.activation_bytes(shape, r, 4, strategy) - memory.activation_bytes(shape, no_head, 4)

    assert head_bytes("zero3", 100) == 128 * 4 * shape.vocab_size * 12  # zero3: the full loss, every position
    assert head_bytes("ddp", 100) == 100 * shape.vocab_size * 12  # chunked: one chunk of 100 positions
    assert head_bytes("ddp", 4096) == 128 * 4 * shape.vocab_size * 12  # a chunk beyond the micro-batch: all of it
