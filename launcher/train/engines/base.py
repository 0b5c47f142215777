"""The interface every strategy implements (engines/__init__.py lists them), and what they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan
from launcher.train.model import build

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Engine(ABC):
    """One strategy's way of holding and updating the model; the loop (train.run) talks to nothing else."""

    sharded = "nothing"
    # the dtype a 4-bit base's packed weights are stored in (model.bnb_config): that of the strategy's shards,
    # so that casting the shards leaves the packed bytes intact; None: bitsandbytes' uint8 (nothing is cast)
    quant_storage: torch.dtype | None = None

    def __init__(self, accelerator, recipe: Recipe, plan: Plan):
        self.acc, self.recipe, self.plan = accelerator, recipe, plan
        self.model: torch.nn.Module | None = None
        self.optimizer = None  # what steps
        self.base_optimizer: torch.optim.Optimizer | None = None  # the torch AdamW the scheduler drives

    def build_model(self, recipe: Recipe, tokenizer) -> torch.nn.Module:
        """The model this rank starts from: every rank loads the pretrained weights (fsdp: rank 0 only)."""
        return build(recipe, tokenizer, self.acc.device, quant_storage=self.quant_storage)

    @abstractmethod
    def prepare(self, model: torch.nn.Module, make_optimizer: OptimizerFactory) -> torch.nn.Module:
        """Wrap (or shard) the model and make its optimizer; the model the loop calls."""

    @abstractmethod
    def accumulating(self, sync: bool):
        """Wraps a micro-batch's forward: gradients are reduced across ranks only when `sync`."""

    @abstractmethod
    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        """Backward of a micro-batch's (already globally scaled) loss."""

    @abstractmethod
    def step(self) -> float | None:
        """Clip, step and zero the gradients; the global gradient norm when clipping."""

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, folder: Path) -> None:
        """Model and optimizer states beyond what accelerator.save_state writes (nothing for DDP)."""
        return None

    # whether save_async exists: the sharded states written in the background (checkpoint.save_in_background)
    saves_in_background = False

    def save_async(self, folder: Path, written: Callable[[], None] | None) -> Future:
        """Start writing what save() writes; return once the states are staged in host memory. The future is
        done when this rank's files are written; `written()` runs in the writing thread before that."""
        raise NotImplementedError(f"{type(self).__name__} saves synchronously")

    def load(self, folder: Path, saved_world_size: int) -> None:
        """Restore what save() wrote; `saved_world_size`: the checkpoint's, which may differ from this run's."""
        return None

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that is never trained (the reference of a preference loss), held the way this strategy holds
        the trained one: here whole on every rank; zero3 and fsdp shard it too."""
        model.requires_grad_(False)
        return model.to(self.acc.device).eval()

    @abstractmethod
    def unwrapped(self) -> torch.nn.Module:
        """The model without the strategy's wrapper (what save_pretrained exports)."""

    def full_state_dict(self) -> dict | None:
        """Full weights on rank 0, for the export; None: the unwrapped model's own state is full already.
        Called on every rank (gathering is a collective)."""
        return None

    def local_tensors(self) -> list[torch.Tensor]:
        """The parameter values this rank holds."""
        return [p.detach() for p in self.unwrapped().parameters()]

    def held(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole) of what the strategy shards."""
        numel = sum(t.numel() for t in self.local_tensors())
        return numel, numel

    def held_by(self, module: torch.nn.Module) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole) of a module from `frozen`."""
        params = list(module.parameters())
        return sum(self._local(p).numel() for p in params), sum(self._numel(p) for p in params)

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        return param.detach()

    def _numel(self, param: torch.Tensor) -> int:
        return param.numel()

    def _settle(self) -> None:
        """Bring the parameters back to the state that `_local` reads."""
        return None

    def trainable_norms(self) -> dict[str, float]:
        """Each trainable parameter's norm, summed from the shards the ranks hold (a collective when sharded):
        the trained values, independent of how the export gathers them."""
        self._settle()
        named = [(n, p) for n, p in self.unwrapped().named_parameters() if p.requires_grad]
        squares = torch.tensor(
            [float(self._local(p).double().pow(2).sum()) for _, p in named], dtype=torch.float64, device=self.acc.device
        )
        if self.sharded == "parameters":
            torch.distributed.all_reduce(squares)
        return {n: float(v) for (n, _), v in zip(named, squares.sqrt().tolist())}
