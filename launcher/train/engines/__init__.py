"""How the ranks hold and update the model: DDP, DeepSpeed ZeRO-1/2/3, or torch FSDP2.

The loop in run.py talks to one small interface (`Engine`): prepare the model
and optimizer, run a micro-batch's backward, step, save and load the sharded
states, and gather full weights for the export. Each strategy is driven
directly by its own library, so CPU tests exercise the code that runs on GPUs:

- ddp: Accelerate (as before).
- zero1/2/3: `deepspeed.initialize` with the plan's config and the recipe's
  AdamW as a client optimizer. Accelerate's DeepSpeed wrapper would step on
  every micro-batch unless its own accumulation context is used, and on CPU it
  needs a gloo workaround; calling DeepSpeed directly needs neither.
- fsdp: torch's `fully_shard` (FSDP2) per transformer block and on the root.
  Accelerate's FSDP path silently does nothing on CPU.

Sharded checkpoints: DeepSpeed's own (`save_checkpoint`) and torch.distributed.
checkpoint for FSDP2, written beside Accelerate's RNG and scheduler states in
the same atomic checkpoint folder.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from launcher.config.recipe import Recipe
from launcher.planning.plan import Plan

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


class Engine:
    """DDP through Accelerate: the model is replicated, so every rank holds all of it."""

    sharded = "nothing"

    def __init__(self, accelerator, recipe: Recipe, plan: Plan):
        self.acc, self.recipe, self.plan = accelerator, recipe, plan
        self.model: torch.nn.Module | None = None
        self.optimizer = None  # what steps
        self.base_optimizer: torch.optim.Optimizer | None = None  # the torch AdamW the scheduler drives

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

    def trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def save(self, folder: Path) -> None:
        """Model and optimizer states beyond what accelerator.save_state writes (nothing for DDP)."""

    def load(self, folder: Path, saved_world_size: int) -> None:
        """Restore what save() wrote; `saved_world_size`: the checkpoint's, which may differ from this run's."""

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

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

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        return param.detach()

    def _settle(self) -> None:
        """Bring the parameters back to the state that `_local` reads."""

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


def skip_deepspeed_shm_op() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory allreduce (minutes) at init; plain gloo does the job.
    (`import deepspeed.comm.torch as x` would bind the real torch module: deepspeed.comm re-exports it.)"""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedEngine(Engine):
    def __init__(self, accelerator, recipe: Recipe, plan: Plan):
        super().__init__(accelerator, recipe, plan)
        self.config = plan.deepspeed_config
        self.stage = self.config["zero_optimization"]["stage"]
        self.sharded = "parameters" if self.stage == 3 else "optimizer states"
        if plan.device == "cpu":
            skip_deepspeed_shm_op()
        import deepspeed

        deepspeed.init_distributed(dist_backend=plan.backend)  # adopts Accelerate's process group
        self._hf_config = None
        if self.stage == 3 and recipe.model.lora is None:
            # from_pretrained then loads each rank's shard only (deepspeed.zero.Init), so a model larger than one
            # GPU can be loaded; transformers holds this object by weak reference, hence the attribute.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(self.config)

    def prepare(self, model, make_optimizer):
        import deepspeed

        self.base_optimizer = make_optimizer(model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.base_optimizer, config=self.config
        )
        return self.model

    def accumulating(self, sync):
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss, sync):
        # the loop already scales the loss to the global mean, so DeepSpeed must not divide by accumulation again
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()  # DeepSpeed counts micro-steps; it updates only at the accumulation boundary

    def step(self):
        # clipping happened inside DeepSpeed's step (gradient_clipping in the config)
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None and self.recipe.train.grad_clip is not None else None

    def save(self, folder):
        self.model.save_checkpoint(
            str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=self.recipe.model.lora is not None
        )

    def load(self, folder, saved_world_size):
        if saved_world_size != self.acc.num_processes:
            return self._load_resharded(folder)
        path, _ = self.model.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_lr_scheduler_states=False,
            load_module_strict=self.recipe.model.lora is None,
        )
        if path is None:
            raise RuntimeError(f"no DeepSpeed state in {folder}; was it written with another strategy?")

    def _load_resharded(self, folder: Path) -> None:
        """ZeRO partitions depend on the world size, so a checkpoint of another world size is converted to
        DeepSpeed's universal checkpoint (one fp32 file per parameter and per Adam moment) by rank 0, into a
        hidden folder beside the checkpoint (which stays as written), and loaded from there by every rank."""
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        universal = folder.parent / f".universal-{folder.name}"
        if self.acc.is_main_process:
            print(
                f"resharding the ZeRO states of {folder.name} for {self.acc.num_processes} processes through "
                "DeepSpeed's universal checkpoint",
                flush=True,
            )
            shutil.rmtree(universal, ignore_errors=True)
            # inject_missing_state: a plain (non-Megatron) model has no UNIVERSAL_CHECKPOINT_INFO; 1 worker: no
            # process pool. Its progress prints would flood the rank's log.
            with contextlib.redirect_stdout(io.StringIO()):
                ds_to_universal.main(
                    Namespace(
                        input_folder=str(folder / "deepspeed" / "state"),
                        output_folder=str(universal / "state"),
                        num_extract_workers=1,
                        num_merge_workers=1,
                        keep_temp_folder=False,
                        strict=True,
                        inject_missing_state=True,
                    )
                )
        self.acc.wait_for_everyone()
        config = self.model._config
        config.load_universal_checkpoint = True
        try:
            path, _ = self.model.load_checkpoint(
                str(universal),
                tag="state",
                load_lr_scheduler_states=False,
                load_module_strict=self.recipe.model.lora is None,
            )
        finally:
            config.load_universal_checkpoint = False
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed state in {folder}; was it written with another strategy?")

    def unwrapped(self):
        return self.model.module

    def full_state_dict(self):
        if self.stage == 3:
            return self.model._zero3_consolidated_16bit_state_dict()
        return None

    def _local(self, param):
        return param.ds_tensor.detach() if self.stage == 3 else param.detach()

    def local_tensors(self):
        return [self._local(p) for p in self.model.module.parameters()]

    def held(self):
        if self.stage == 3:
            return (
                sum(p.ds_tensor.numel() for p in self.model.module.parameters()),
                sum(p.ds_numel for p in self.model.module.parameters()),
            )
        # ZeRO-1/2: each rank keeps the fp32 master weights and Adam states of its partition only
        local = sum(t.numel() for t in self.optimizer.single_partition_of_fp32_groups)
        return local, sum(p.numel() for p in self.model.module.parameters() if p.requires_grad)


class FSDPEngine(Engine):
    sharded = "parameters"

    def prepare(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(self.plan.device, (self.plan.world_size,))
        kwargs = {"mesh": mesh}
        if self.plan.offload == "cpu":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in _blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.model = model
        # the optimizer must see the sharded (DTensor) parameters, so it is made after sharding
        self.base_optimizer = self.optimizer = make_optimizer(model)
        return model

    def accumulating(self, sync):
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def backward(self, loss, sync):
        loss.backward()

    def step(self):
        norm = None
        if self.recipe.train.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable(), self.recipe.train.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, folder):
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(folder / "fsdp"))

    def load(self, folder, saved_world_size):
        # DCP records each shard's offsets and reshards on load, so any saved world size reads the same way
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder / "fsdp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def unwrapped(self):
        return self.model

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _local(self, param):
        return param.detach().to_local()

    def _settle(self):
        # FSDP2 leaves the root module's parameters gathered after a forward (e.g. the last evaluation)
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def local_tensors(self):
        self._settle()
        return [self._local(p) for p in self.model.parameters()]

    def held(self):
        return sum(t.numel() for t in self.local_tensors()), sum(p.numel() for p in self.model.parameters())


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (the model's own `_no_split_modules`), each sharded as one unit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RuntimeError(
            f"{type(base).__name__} names no transformer block class (_no_split_modules); "
            "fsdp cannot find the units to shard; use zero3"
        )
    return blocks


def make_engine(accelerator, recipe: Recipe, plan: Plan) -> Engine:
    """Made before the model is loaded: ZeRO-3 changes how from_pretrained loads."""
    if plan.strategy in ("zero1", "zero2", "zero3"):
        return DeepSpeedEngine(accelerator, recipe, plan)
    if plan.strategy == "fsdp":
        return FSDPEngine(accelerator, recipe, plan)
    return Engine(accelerator, recipe, plan)
