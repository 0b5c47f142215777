"""Real learning, in one process: multi-turn chat SFT, DPO / ORPO / SimPO and a reward model on the example
data (recipes/data/conversations, recipes/data/preference: the chosen answer describes with kind words, the
rejected one with unkind words) and a tiny word-level Llama (conftest `word_llama`).

Training runs the task hooks and losses exactly as train.run's step does (the micro-batch's summed loss over
the batch's loss terms, AdamW); evaluation is the launcher's own Evaluator on the held-out split. The same
recipes run end to end through `launch` in tests/integration/test_pair_tasks.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RECIPES

from launcher.config.recipe import Recipe
from launcher.planning.plan import make_plan
from launcher.train.data import Collate, open_prepared
from launcher.train.engines.ddp import DDPEngine
from launcher.train.evaluate import Evaluator
from launcher.train.losses import LossContext, build_loss
from launcher.train.model import build, load_tokenizer
from launcher.train.tasks import IGNORE, hooks

PAIRS = RECIPES / "data" / "preference"
CHATS = RECIPES / "data" / "conversations"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose a lot to them on a busy machine (40 steps: 2.8 s on one
    thread, 59 s on two under a load of 12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe_for(model: str, data, task: dict, lora: bool = False, **train) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"path": model, **({"lora": {"r": 8, "alpha": 16, "dropout": 0.0}} if lora else {})},
            "task": task,
            "data": {
                "train": str(data / "train.jsonl"),
                "validation": str(data / "validation.jsonl"),
                "max_length": 64,
            },
            "train": {"batch_size": 16, **train},
            "output_dir": "unused",
        }
    )


class Trainer:
    """One recipe's tokenized splits, model, loss and evaluator; `steps(n)` trains like train.run."""

    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator

        torch.manual_seed(0)
        self.recipe, tokenizer = recipe, load_tokenizer(recipe)
        self.task = hooks(recipe, tokenizer)
        data = open_prepared(recipe, tokenizer, say=lambda line: None)  # checked, tokenized into the cache
        self.rows = {name: list(data[name]) for name in ("train", "validation", "test") if len(data[name])}
        accelerator = Accelerator(cpu=True)
        plan = make_plan(recipe, num_train_samples=len(data.train), procs_per_node=1)
        self.model = build(recipe, tokenizer)
        self.task.set_up(DDPEngine(accelerator, recipe, plan), lambda: build(recipe, tokenizer))
        self.loss_fn = build_loss(recipe.task.resolved_loss, LossContext(recipe.task.spec))
        self.collate = Collate(self.task)
        self.evaluate = Evaluator(accelerator, self.model, self.loss_fn, self.collate, self.task, recipe, plan)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=recipe.train.optimizer.lr, weight_decay=0.0)
        self.order = np.random.default_rng(0)

    def steps(self, n: int) -> list[float]:
        losses, train = [], self.rows["train"]
        self.model.train()
        for _ in range(n):
            rows = [train[i] for i in self.order.choice(len(train), self.recipe.train.batch_size, replace=False)]
            loss = self.task.loss(self.model, self.collate(rows), self.loss_fn) / sum(r["weight"] for r in rows)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            losses.append(float(loss.detach()))
        return losses

    def held_out(self) -> dict:
        return self.evaluate(self.rows["validation"])


PREFERENCE = {
    # loss: (task.loss, LoRA: DPO's reference is the adapter-disabled base; without it, a frozen copy, lr)
    "dpo-lora": ({"name": "dpo", "beta": 0.1}, True, 1e-2),
    "dpo-frozen-copy": ({"name": "dpo", "beta": 0.1}, False, 3e-3),
    "orpo": ({"name": "orpo", "beta": 0.1}, False, 3e-3),
    "simpo": ({"name": "simpo", "beta": 2.0, "gamma": 0.5}, False, 3e-3),
}


@pytest.mark.parametrize("case", list(PREFERENCE))
def test_preference_losses_learn_the_rule_held_out(word_llama, case):
    loss, lora, lr = PREFERENCE[case]
    task = {"type": "preference", "chat_template": True, "loss": loss}
    trainer = Trainer(recipe_for(word_llama, PAIRS, task, lora=lora, optimizer={"lr": lr}))
    before = trainer.held_out()
    if loss["name"] == "dpo":  # the policy starts equal to its reference: every reward is 0, a tie
        assert before["reward_accuracy"] == 0.5 and before["reward_margin"] == 0.0
        assert before["loss"] == pytest.approx(np.log(2), abs=1e-6)
    else:  # rewards are the untrained model's own length-normalised log-probabilities: no preference yet
        assert 0.2 <= before["reward_accuracy"] <= 0.8, before
    trainer.steps(40)
    after = trainer.held_out()
    print(f"{case}: held-out reward accuracy {before['reward_accuracy']:.3f} → {after['reward_accuracy']:.3f}")
    assert after["reward_accuracy"] >= 0.8, (before, after)
    assert after["reward_margin"] > 0 and after["loss"] < before["loss"]
    if case == "dpo-frozen-copy":
        reference = trainer.task.reference
        assert reference is not trainer.model and not any(p.requires_grad for p in reference.parameters())
        fresh = build(trainer.recipe, trainer.task.tok)
        assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), fresh.state_dict().values()))


def test_reward_model_ranks_held_out_pairs(word_llama):
    trainer = Trainer(
        recipe_for(word_llama, PAIRS, {"type": "reward_model", "chat_template": True}, optimizer={"lr": 3e-3})
    )
    before = trainer.held_out()
    trainer.steps(40)
    after = trainer.held_out()
    print(
        f"reward model: held-out pairwise accuracy {before['pairwise_accuracy']:.3f} → {after['pairwise_accuracy']:.3f}"
    )
    assert after["pairwise_accuracy"] >= 0.8 and after["loss"] < before["loss"], (before, after)


def test_chat_sft_lowers_held_out_assistant_perplexity(word_llama):
    trainer = Trainer(recipe_for(word_llama, CHATS, {"type": "chat"}, optimizer={"lr": 3e-3}))
    before = trainer.held_out()["perplexity"]
    trainer.steps(40)
    after = trainer.held_out()["perplexity"]
    print(f"chat SFT: held-out assistant-token perplexity {before:.1f} → {after:.2f}")
    assert after < 0.2 * before, (before, after)


def test_chat_sft_never_trains_on_user_tokens(word_llama):
    """The loss has no gradient at positions whose next token is not the assistant's, and a change to what the
    user says after the last answer changes no gradient at all."""
    trainer = Trainer(recipe_for(word_llama, CHATS, {"type": "chat"}))
    task, model = trainer.task, trainer.model
    chat = [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "two plus three is five."},
        {"role": "user", "content": "And plus one?"},
        {"role": "assistant", "content": "five plus one is six."},
    ]
    row = task.tokenize({"messages": chat})
    batch = trainer.collate([row])
    logits = task.logits(model, batch).detach().requires_grad_(True)
    trainer.loss_fn(logits, batch["labels"]).backward()
    targets = row["labels"][1:] + [IGNORE]  # position t is scored on token t + 1
    touched = [bool(g.abs().sum() > 0) for g in logits.grad[0]]
    assert touched == [t != IGNORE for t in targets]
    assert sum(touched) == len("two plus three is five . </s> five plus one is six . </s>".split())

    def gradients(messages):
        model.zero_grad()
        trainer.task.loss(model, trainer.collate([task.tokenize({"messages": messages})]), trainer.loss_fn).backward()
        return [p.grad.clone() for p in model.parameters()]

    later_user = [*chat, {"role": "user", "content": "What is nine plus nine?"}]
    assert all(torch.equal(a, b) for a, b in zip(gradients(chat), gradients(later_user)))
