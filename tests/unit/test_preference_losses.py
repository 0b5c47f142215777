"""The preference losses against TRL's own code on the same log-probabilities, to 1e-6.

TRL (a test extra) is called as it is: DPOTrainer._compute_loss (sigmoid, hinge, IPO) on a stand-in model
that returns the given per-token log-probabilities, and the loss methods of ORPOTrainer and CPOTrainer
(SimPO; and the cDPO label-smoothing formula, which TRL 1.x ships in CPO's sigmoid loss, not in DPO's) on an
object carrying their settings. Our losses return the sum over pairs; TRL's, the mean.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from launcher.config.losses import DPO, ORPO, BradleyTerry, SimPO
from launcher.config.tasks import TASKS
from launcher.train.losses import LossContext, build_loss
from launcher.train.tasks import IGNORE, PairLogps

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
B, T = 6, 9


def build(cfg, task: str = "preference"):
    return build_loss(cfg, LossContext(TASKS[task]))


@pytest.fixture(scope="module")
def batch():
    """Per-token log-probabilities of 6 pairs ([chosen..., rejected...]), answers of different lengths."""
    torch.manual_seed(0)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row in range(2 * B):
        completion[row, 2 + row % 3 :] = 1  # prompts of 2 to 4 tokens
    per_token = -torch.rand(2 * B, T - 1, dtype=torch.float64) * 3 * completion[:, 1:]
    ref_per_token = -torch.rand(2 * B, T - 1, dtype=torch.float64) * 3 * completion[:, 1:]
    return completion, per_token, ref_per_token


def pair_logps(per_token, completion) -> PairLogps:
    sums, counts = per_token.sum(1), completion[:, 1:].sum(1)
    return PairLogps(*sums.chunk(2), *counts.chunk(2))


def trl_dpo_loss(completion, per_token, ref_per_token, variant: str, beta: float) -> float:
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[variant], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    zeros = torch.zeros_like(per_token)

    def model(**kwargs):  # what TRL's fused LM head returns, for the given log-probabilities
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    ref_chosen, ref_rejected = ref_per_token.sum(1).chunk(2)
    inputs = {
        "input_ids": torch.ones_like(completion),
        "attention_mask": torch.ones_like(completion),
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return float(trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False))


@pytest.mark.parametrize("variant", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(batch, variant, beta):
    completion, per_token, ref_per_token = batch
    ours = build(DPO(name="dpo", beta=beta, variant=variant))
    value = float(ours(pair_logps(per_token, completion), pair_logps(ref_per_token, completion))) / B
    assert value == pytest.approx(trl_dpo_loss(completion, per_token, ref_per_token, variant, beta), abs=1e-6)


def test_dpo_label_smoothing_is_cdpo_as_trl_computes_it(batch):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    completion, per_token, ref_per_token = batch
    policy, reference = pair_logps(per_token, completion), pair_logps(ref_per_token, completion)
    cfg = DPO(name="dpo", beta=0.3, label_smoothing=0.2)
    trainer = SimpleNamespace(alpha=0.0, beta=0.3, loss_type="sigmoid", label_smoothing=0.2, accelerator=CPU)
    losses, _, _ = CPOTrainer.cpo_loss(trainer, policy.chosen - reference.chosen, policy.rejected - reference.rejected)
    assert float(build(cfg)(policy, reference)) == pytest.approx(float(losses.sum()), abs=1e-6)


CPU = SimpleNamespace(device="cpu")


def test_orpo_equals_trl(batch):
    """ORPO = the chosen answer's mean NLL − beta · TRL's odds_ratio_loss (on mean log-probs). TRL's NLL is the
    token mean over the batch, prompt tokens included; ours is each pair's mean over its answer (the paper's
    per-example L_SFT), so the term compared with TRL's is the odds-ratio term and the NLL is checked by hand."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    completion, per_token, _ = batch
    policy = pair_logps(per_token, completion)
    chosen, rejected = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    losses, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.25, accelerator=CPU), chosen, rejected)
    expected = float((-chosen - losses).sum())
    assert float(build(ORPO(name="orpo", beta=0.25))(policy)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
def test_simpo_equals_trl(batch, gamma):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    completion, per_token, _ = batch
    policy = pair_logps(per_token, completion)
    chosen, rejected = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
    trainer = SimpleNamespace(alpha=0.0, beta=2.0, loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0)
    losses, _, _ = CPOTrainer.cpo_loss(SimpleNamespace(**vars(trainer), accelerator=CPU), chosen, rejected)
    value = float(build(SimPO(name="simpo", beta=2.0, gamma=gamma))(policy))
    assert value == pytest.approx(float(losses.sum()), abs=1e-6)


def test_sequence_log_probabilities_equal_trl(batch):
    """PairLogps.of (what the hooks feed the losses) against TRL's get_batch_logps on the same logits."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    completion, _, _ = batch
    torch.manual_seed(1)
    logits = torch.randn(2 * B, T, 11)
    labels = torch.randint(0, 11, (2 * B, T)).masked_fill(completion == 0, IGNORE)
    ours = PairLogps.of(logits, labels)
    sums = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=False)
    means = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    assert torch.allclose(torch.cat([ours.chosen, ours.rejected]), sums, atol=1e-6)
    counts = torch.cat([ours.chosen_tokens, ours.rejected_tokens])
    assert torch.allclose(torch.cat([ours.chosen, ours.rejected]) / counts, means, atol=1e-6)


def test_an_untrained_policy_scores_log_2_and_its_rewards_are_zero(batch):
    completion, per_token, _ = batch
    same = pair_logps(per_token, completion)
    loss = build(DPO(name="dpo"))
    assert float(loss(same, same)) == pytest.approx(B * math.log(2), abs=1e-9)
    chosen, rejected = loss.rewards(same, same)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_bradley_terry_is_trl_reward_loss():
    """TRL's RewardTrainer: -logsigmoid(chosen - rejected).mean() (without a margin or centering)."""
    torch.manual_seed(2)
    chosen, rejected = torch.randn(8), torch.randn(8)
    value = float(build(BradleyTerry(name="bradley_terry"), "reward_model")(chosen, rejected))
    assert value == pytest.approx(float(-F.logsigmoid(chosen - rejected).mean()) * 8, abs=1e-6)
