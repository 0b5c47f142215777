"""FLOPs of a training step and the peak they are measured against: MFU, torch-free.

MFU (model FLOPs utilisation, PaLM appendix B; torchtitan's `num_flop_per_token`) = achieved model FLOP/s over
the device's peak. Per token, a training step does 6·N FLOPs in the dense layers (2 forward, 4 backward; N =
parameters without the input embedding, whose lookup is no matmul) plus 12·L·H·T in attention (L layers, H the
query width heads × head dim, T the sequence the token attends over). Attention never crosses a sequence
boundary here, so T is each token's own sequence: a step's attention FLOPs are 12·L·H·Σ len², which is the
usual 12·L·H·T per token when every row is T tokens long. Padding is not model work: it is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s per GPU, from NVIDIA's datasheets (their headline figures
# are "with sparsity": halved here). First match of the pattern in torch.cuda.get_device_name() wins.
#   H100/H200 SXM: "BF16 Tensor Core 1,979 TFLOPS*" (* with sparsity) → 989.5    H100 NVL 1,671 → 835.5
#   H100 PCIe 1,513 → 756.5    A100 (SXM and PCIe): 312 dense    L40S 733 → 366.5    L4 242 → 121
# The cluster profile's peak_tflops overrides it (other GPUs, clocks, or a measured matmul peak).
PEAK_TFLOPS: list[tuple[str, float]] = [
    (r"H200", 989.5),
    (r"H100.*NVL", 835.5),
    (r"H100.*PCIe", 756.5),
    (r"H100", 989.5),
    (r"A100", 312.0),
    (r"L40S", 366.5),
    (r"\bL4\b", 121.0),
]


def peak_flops(device_name: str | None, override_tflops: float | None = None) -> float | None:
    """FLOP/s of one device: the profile's override, else the table's entry for its name (None: unknown, e.g.
    a CPU, so MFU is not reported)."""
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    return next((tf * 1e12 for pattern, tf in PEAK_TFLOPS if re.search(pattern, device_name)), None)


def model_flops(num_dense_params: int, num_layers: int, attention_width: int, tokens: float, squares: float) -> float:
    """6·N·tokens + 12·L·H·Σ len² (`squares`): the model FLOPs of training on those tokens (module docstring)."""
    return 6.0 * num_dense_params * tokens + 12.0 * num_layers * attention_width * squares


def step_flops(num_dense_params: int, num_layers: int, attention_width: int, lengths: Iterable[int]) -> float:
    """Model FLOPs of training on sequences of `lengths` tokens (forward and backward)."""
    lengths = list(lengths)
    return model_flops(num_dense_params, num_layers, attention_width, sum(lengths), sum(n * n for n in lengths))


def mfu(flops: float, seconds: float, world_size: int, peak: float | None) -> float | None:
    """Achieved FLOP/s per device over its peak (None when the peak is unknown or nothing was timed)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / world_size / peak
