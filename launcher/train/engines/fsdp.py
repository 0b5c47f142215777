"""fsdp: torch FSDP2, `fully_shard` per transformer block and on the root (Accelerate's FSDP path silently
does nothing on CPU); checkpoints through torch.distributed.checkpoint, which reshards on load."""

from __future__ import annotations

import contextlib

import torch

from launcher.train.engines.base import Engine


class FSDPEngine(Engine):
    sharded = "parameters"

    def prepare(self, model, make_optimizer):
        self.model = self._shard(model)
        # the optimizer must see the sharded (DTensor) parameters, so it is made after sharding
        self.base_optimizer = self.optimizer = make_optimizer(model)
        return model

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        mesh = init_device_mesh(self.plan.device, (self.plan.world_size,))
        kwargs = {"mesh": mesh}
        if self.plan.offload == "cpu":
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in _blocks(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
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
