"""The causal-LM loss without the full logits: the LM head and the loss run a chunk of positions at a time.

The full loss materialises [batch, seq, vocab] logits, their fp32 upcast and their gradient: at batch 8 × 2048
tokens and a 128k vocabulary that is 8 GiB per copy in fp32, more than a 1B model's weights. Here:

1. the model runs through its wrapper (DDP, DeepSpeed, PEFT: their forward bookkeeping stays intact) with a
   forward pre-hook on the LM head that keeps the head's input (the final hidden states) and hands the head
   zero positions, so it computes no logits at all;
2. only positions that have a target (the next token's label is not IGNORE: no padding, no masked prompt) are
   gathered, in chunks of train.lm_loss_chunk tokens;
3. each chunk's logits and loss are computed under activation checkpointing, so backward recomputes that
   chunk's logits instead of keeping them: at most one chunk of logits exists at a time.

The loss function is the task's own (the registry's, launcher.train.losses, without its shift): the value and
the gradients are those of the full loss, up to float summation order. `liger` hands the same gathered hidden
states to Liger's fused linear cross-entropy (Triton, CUDA only), which never writes the logits to memory.

The head's weight is read outside the model's forward, so strategies that shard parameters (zero3, fsdp) are
refused at plan time (launcher.planning.speed), as are models that transform logits after the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from launcher.train.tasks import IGNORE


class HeadInput:
    """`with HeadInput(head) as seen: model(...)`: seen.hidden is what the head was called with; the head itself
    was given none of it (its output has zero positions)."""

    def __init__(self, head: torch.nn.Module):
        if type(head) is not torch.nn.Linear:
            raise TypeError(
                f"train.lm_loss chunked/liger needs a plain Linear LM head, this model's is {type(head).__name__} "
                "(a LoRA target or a custom head); use train.lm_loss=full"
            )
        self.head, self.hidden = head, None

    def _keep(self, module, args):
        self.hidden = args[0]
        return (args[0][..., :0, :],)

    def __enter__(self) -> HeadInput:
        self.handle = self.head.register_forward_pre_hook(self._keep)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def targets_of(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets: position t scores label t+1; the last position scores nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def chunked(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, inner, chunk: int) -> torch.Tensor:
    """Σ inner(head(h), y) over the rows of hidden [M, H] and targets [M], `chunk` rows at a time, each chunk's
    logits recomputed in backward rather than kept."""

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return inner(F.linear(h, head.weight, head.bias), y)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], targets[start : start + chunk]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if torch.is_grad_enabled() else piece(h, y))
    return total


def liger(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing)
    return fused(head.weight, hidden, targets, head.bias)


def lm_loss(model, inputs: dict, labels: torch.Tensor, loss_fn, kind: str, chunk: int, label_smoothing: float = 0.0):
    """The summed next-token loss of a micro-batch by `kind` ('chunked' or 'liger'); `loss_fn` is the registry's
    loss (its `per_position` form is used: the targets are shifted here)."""
    inner_model = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model
    head = inner_model.get_output_embeddings()
    with HeadInput(head) as seen:
        model(**inputs)
    targets = targets_of(labels)
    keep = targets != IGNORE
    hidden, targets = seen.hidden[keep], targets[keep]
    if kind == "liger":
        return liger(head, hidden, targets, label_smoothing)
    return chunked(head, hidden, targets, loss_fn.per_position, chunk)
