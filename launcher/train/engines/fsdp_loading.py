"""fsdp: the pretrained weights read once (by rank 0) instead of once per rank.

Rank 0 loads the model as every strategy does (model.build). The other ranks build the same model on the
meta device (`build(on_meta=True)`: shapes only, no storage, no weight read). Around `fully_shard`:

    before   rank 0 broadcasts the layout of its model: every parameter's and buffer's shape and dtype, and
             the quantization state of each 4-bit layer; a mirror rank gives its 4-bit layers rank 0's packed
             shapes (bitsandbytes decides them while quantizing) and checks that the rest agrees
    shard    fully_shard on every rank: rank 0 cuts its real tensors, the others their meta ones
    after    a mirror rank allocates its shards (`to_empty`); rank 0 broadcasts each whole tensor in turn,
             and every rank keeps its own shard of it (buffers, which FSDP does not shard, whole)

So a rank other than 0 holds its shards, one whole tensor in flight, and the 4-bit layers' quantization
constants (which neither FSDP nor ZeRO shards: they are attributes, not parameters); rank 0 holds the whole
model once, as before. bench/memory.py measures both against the planner (memory.host_load_bytes).
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


class RankZeroWeights:
    """The protocol above, for one model: `before_sharding()`, then fully_shard, then `after_sharding()`."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
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
        from torch.distributed.tensor import DTensor, distribute_tensor

        model = self.model
        if not self.source:
            model.to_empty(device=self.device)
        comm = self._comm_device()
        for (name, tensor), (_, shape, dtype) in zip(named_tensors(model), self.layout):
            whole = self.whole.pop(name).to(comm) if self.source else torch.empty(shape, dtype=dtype, device=comm)
            dist.broadcast(whole, src=0)
            if self.source:
                continue  # fully_shard cut rank 0's shards from these very values
            with torch.no_grad():
                if isinstance(tensor, DTensor):
                    mine = distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None)
                    tensor.to_local().copy_(mine.to_local())
                else:
                    tensor.copy_(whole)
            del whole
        self.whole = {}

    def _comm_device(self) -> torch.device:
        """Where a collective's tensors live: the GPU under nccl, host memory under gloo."""
        return torch.device("cpu") if dist.get_backend() == "gloo" else self.device
