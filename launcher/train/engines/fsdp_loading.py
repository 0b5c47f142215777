"""fsdp: the pretrained weights read once (by rank 0) instead of once per rank.

Rank 0 loads the model as every strategy does (model.build). The other ranks build the same model on the
meta device (`build(on_meta=True)`: shapes only, no storage, no weight read). Around `fully_shard`:

    before   rank 0 broadcasts the layout of its model: every parameter's and buffer's shape and dtype, and
             the quantization state of each 4-bit layer; a mirror rank gives its 4-bit layers rank 0's packed
             shapes (bitsandbytes decides them while quantizing) and checks that the rest agrees
    shard    fully_shard on every rank: rank 0 cuts its real tensors, the others their meta ones
    after    a mirror rank allocates its shards (`to_empty`); rank 0 scatters each tensor in turn, every rank
             receiving only its own shard (buffers, which FSDP does not shard, are broadcast whole)

So a rank other than 0 holds its shards (received in place; a shorter last one through a buffer) and the
4-bit layers' quantization constants (which neither FSDP nor ZeRO shards: they are attributes, not
parameters); rank 0 holds the whole model once, as before. bench/memory.py measures both against the
planner (planning/host_memory.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (a tied weight once) and buffers, in the same order on every rank."""
    return list(model.named_parameters()) + list(model.named_buffers())


def _four_bit_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def follow_rank_zero_rng(device: torch.device) -> None:
    """Give every rank rank 0's random state after building: rank 0 drew the random initialisation of new
    modules (a task head, LoRA's A matrices) and a meta rank drew nothing, so their dropout would differ from
    what the same recipe does under ddp (where every rank draws the same)."""
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    dist.broadcast_object_list(states, src=0, device=torch.device("cpu") if dist.get_backend() == "gloo" else device)
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


class RankZeroWeights:
    """The protocol above, for one model: `before_sharding()`, then fully_shard, then `after_sharding()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device, shard_device: torch.device | None = None):
        """`device`: this rank's compute device; `shard_device`: where its shards live (host memory under FSDP's
        CPU offload; default `device`)."""
        self.model, self.device, self.shard_device = model, device, shard_device or device
        self.source = dist.get_rank() == 0
        self.whole: dict[str, torch.Tensor] = {}
        self.layout: list[tuple[str, tuple, torch.dtype]] = []

    def before_sharding(self) -> None:
        model = self.model
        box: list = [None, None]
        if self.source:
            # kept alive past fully_shard (which keeps only rank 0's shard of each tensor) to be broadcast
            self.whole = {name: t.detach() for name, t in named_tensors(model)}
            quant = {
                name: {k: v.cpu() if torch.is_tensor(v) else v for k, v in m.quant_state.as_dict(packed=True).items()}
                for name, m in _four_bit_layers(model).items()
                if m.quant_state is not None
            }
            box = [[(n, tuple(t.shape), t.dtype) for n, t in named_tensors(model)], quant]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        self.layout, quant = box
        if not self.source:
            self._adopt_quantized(quant)
            mine = [(n, tuple(t.shape), t.dtype) for n, t in named_tensors(model)]
            if mine != self.layout:
                first = next((a, b) for a, b in zip(mine + [None] * len(self.layout), self.layout) if a != b)
                raise RuntimeError(
                    f"rank {dist.get_rank()} built another model than rank 0 (first difference: this rank "
                    f"{first[0]}, rank 0 {first[1]}); every rank must build the same recipe"
                )

    def _adopt_quantized(self, quant: dict[str, dict]) -> None:
        """Give each meta 4-bit layer rank 0's packed weight shape and its quantization state."""
        from bitsandbytes.functional import QuantState
        from bitsandbytes.nn import Params4bit

        shapes = {name: (shape, dtype) for name, shape, dtype in self.layout}
        for name, module in _four_bit_layers(self.model).items():
            if name not in quant:
                continue
            shape, dtype = shapes[f"{name}.weight"]
            module.weight = Params4bit(
                torch.empty(shape, dtype=dtype, device="meta"),
                requires_grad=False,
                quant_storage=dtype,
                bnb_quantized=True,
                module=module,
            )
            # bitsandbytes gives the gathered weight this state back at each forward (Linear4bit.forward)
            module.quant_state = QuantState.from_dict(quant[name], device=self.device)

    def after_sharding(self) -> None:
        from torch.distributed.tensor import DTensor

        model = self.model
        if not self.source:
            model.to_empty(device=self.shard_device)
            if self.shard_device != self.device:  # CPU offload: the shards in host memory, the buffers on the GPU
                for module in model.modules():
                    for key, buffer in module._buffers.items():
                        if buffer is not None:
                            module._buffers[key] = buffer.to(self.device)
        comm = self._comm_device()
        for (name, tensor), (_, shape, dtype) in zip(named_tensors(model), self.layout):
            whole = self.whole.pop(name).to(comm) if self.source else None
            if isinstance(tensor, DTensor):
                self._scatter_rows(tensor, whole, shape, dtype, comm)
                continue
            received = whole if self.source else torch.empty(shape, dtype=dtype, device=comm)
            dist.broadcast(received, src=0)  # a buffer: whole on every rank
            if not self.source:
                with torch.no_grad():
                    tensor.copy_(received)
        self.whole = {}

    def _scatter_rows(self, tensor, whole: torch.Tensor | None, shape: tuple, dtype: torch.dtype, comm) -> None:
        """Rank r receives rows [r·c, (r+1)·c) of the tensor, c = ⌈rows / world⌉: FSDP2's dim-0 shards (the
        torch.chunk split), so no rank but 0 ever holds more than one shard of it."""
        from torch.distributed.tensor import Shard

        world, rank = dist.get_world_size(), dist.get_rank()
        if tuple(tensor.placements) != (Shard(0),) or tensor.device_mesh.size() != world:
            raise RuntimeError(f"expected fsdp's dim-0 shards over the world, got {tensor.placements} for {shape}")
        per = -(-shape[0] // world)
        local = tensor.to_local()
        assert local.shape[0] == max(0, min(per, shape[0] - rank * per)), (local.shape, shape)
        # straight into the shard where it is a whole chunk where the collective runs; else through a buffer
        direct = not self.source and local.shape[0] == per and local.is_contiguous() and local.device == comm
        mine = local.detach() if direct else torch.empty((per, *shape[1:]), dtype=dtype, device=comm)
        parts = None
        if self.source:  # views of the tensor; a padded copy only when its rows do not split evenly
            padded = whole
            if per * world != shape[0]:
                padded = torch.zeros((per * world, *shape[1:]), dtype=dtype, device=comm)
                padded[: shape[0]].copy_(whole)
            parts = list(padded.contiguous().chunk(world))
        dist.scatter(mine, parts, src=0)
        if not self.source and not direct:
            with torch.no_grad():
                local.copy_(mine[: local.shape[0]])

    def _comm_device(self) -> torch.device:
        """Where a collective's tensors live: the GPU under nccl, host memory under gloo."""
        return torch.device("cpu") if dist.get_backend() == "gloo" else self.device
