"""ddp: the model replicated on every rank, gradients all-reduced, through Accelerate."""

from __future__ import annotations

import contextlib

import torch

from launcher.train.engines.base import Engine, OptimizerFactory


class DDPEngine(Engine):
    """DDP through Accelerate: the model is replicated, so every rank holds all of it."""

    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> torch.nn.Module:
        self.base_optimizer = make_optimizer(model)
        self.model, self.optimizer = self.acc.prepare(model, self.base_optimizer)
        return self.model

    def accumulating(self, sync: bool):
        """Wraps a micro-batch's forward: gradients are reduced across ranks only when `sync`."""
        return contextlib.nullcontext() if sync else self.acc.no_sync(self.model)

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.acc.backward(loss)

    def step(self) -> float | None:
        """Clip, step and zero the gradients; the global gradient norm when clipping."""
        norm = None
        if self.recipe.train.grad_clip is not None:
            norm = self.acc.clip_grad_norm_(self.trainable(), self.recipe.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)
