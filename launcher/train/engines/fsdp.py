"""fsdp: torch FSDP2, `fully_shard` per transformer block and on the root (Accelerate's FSDP path silently
does nothing on CPU); the pretrained weights read by rank 0 only and scattered shard by shard
(fsdp_loading.py); checkpoints through torch.distributed.checkpoint, which reshards on load."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint import FileSystemWriter

from launcher.train.engines.base import Engine
from launcher.train.engines.fsdp_loading import RankZeroWeights, follow_rank_zero_rng
from launcher.train.model import build


class FSDPEngine(Engine):
    sharded = "parameters"
    # FSDP2 keeps each shard in its parameter's dtype (no MixedPrecisionPolicy here: bf16 is autocast), and
    # prepare_model_for_kbit_training makes every other parameter fp32, so the packed 4-bit weights are too
    quant_storage = torch.float32
    _save_group = None  # the gloo group of background checkpoint writes (save_async)

    def build_model(self, recipe, tokenizer):
        """Rank 0 loads the pretrained weights; the other ranks build the model on the meta device."""
        if self.acc.num_processes == 1:
            return super().build_model(recipe, tokenizer)
        on_meta = not self.acc.is_main_process
        model = build(recipe, tokenizer, self.acc.device, quant_storage=self.quant_storage, on_meta=on_meta)
        follow_rank_zero_rng(self.acc.device)
        return model

    def prepare(self, model, make_optimizer):
        self.model = self._shard(model)
        if self.recipe.train.checkpoint_async:  # made now (a collective), not in the first save's stall
            self._save_group = torch.distributed.new_group(backend="gloo")
        # the optimizer must see the sharded (DTensor) parameters, so it is made after sharding
        self.base_optimizer = self.optimizer = make_optimizer(model)
        return model

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """fully_shard per block and on the root; a model built on the meta device (build_model: every rank but
        0) receives its shards of rank 0's weights (fsdp_loading)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(self.plan.device, (self.plan.world_size,))
        kwargs = {"mesh": mesh}
        if self.plan.offload == "cpu":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        shard_device = torch.device("cpu") if self.plan.offload == "cpu" else self.acc.device
        weights = RankZeroWeights(model, self.acc.device, shard_device) if self.acc.num_processes > 1 else None
        if weights is not None:
            weights.before_sharding()
        for block in _blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        if weights is not None:
            weights.after_sharding()
        return model

    def frozen(self, model):
        """Sharded like the trained model, block by block (a reference model held whole would undo fsdp)."""
        model.requires_grad_(False)
        return self._shard(model).eval()

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

    saves_in_background = True

    def save_async(self, folder, written):
        """torch DCP's async_save: the shards are copied to host memory here, then written by a thread.
        Its collectives (save plan, metadata) run on a gloo group of their own (made in prepare), so that
        they never interleave with the training's collectives on the world group."""
        import torch.distributed.checkpoint as dcp

        writer = _NotifyingWriter(str(folder / "fsdp"), written)
        return dcp.async_save(self._dcp_state(), storage_writer=writer, process_group=self._save_group)

    def load(self, folder, saved_world_size):
        # DCP records each shard's offsets and reshards on load, so any saved world size reads the same way
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        from launcher.train.unpickling import dcp_reader

        state = self._dcp_state()
        dcp.load(state, storage_reader=dcp_reader(folder / "fsdp"))  # its metadata unpickled with an allow-list
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


class _NotifyingWriter(FileSystemWriter):
    """DCP's file writer that calls `written()` once this rank's shard files are written, before the checkpoint's
    metadata (the failure drill's phase=write, inside the background write)."""

    def __init__(self, path: str, written):
        super().__init__(path)
        self._written = written

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        if self._written is not None:
            self._written()
        return future


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
