"""What the local backend reads of this machine's GPUs without torch: their memory, for `strategy: auto`."""

from __future__ import annotations

from launcher.backends.local import smallest_gpu_memory

# `nvidia-smi --query-gpu=index,uuid,memory.total --format=csv,noheader,nounits` on a mixed 3-GPU machine
QUERY = "0, GPU-5b2c1f3e-aaaa, 81559\n1, GPU-7d9e0a1b-bbbb, 40960\n2, GPU-1f2e3d4c-cccc, 81559\n"


def test_gpu_memory_is_that_of_the_smallest_visible_gpu():
    assert smallest_gpu_memory(QUERY, None) == 40960 * 2**20
    assert smallest_gpu_memory(QUERY, "0,2") == 81559 * 2**20  # CUDA_VISIBLE_DEVICES by index
    assert smallest_gpu_memory(QUERY, "GPU-7d9e0a1b-bbbb") == 40960 * 2**20  # or by UUID
    assert smallest_gpu_memory(QUERY, "5") is None  # nothing visible that nvidia-smi lists


def test_no_gpu_or_an_unreadable_answer_gives_no_memory():
    assert smallest_gpu_memory("", None) is None
    assert smallest_gpu_memory("No devices were found\n", None) is None
    assert smallest_gpu_memory("0, GPU-x, [N/A]\n", None) is None
