"""Device KV cache tensors, sized from a memory budget."""
from __future__ import annotations

import math
import mmap
import os
from typing import List, Tuple

import torch

_GiB = 1 << 30


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * _GiB


def device_kv_budget(cache_cfg, device: torch.device) -> int:
    """Bytes the device KV tier may use (see CacheConfig for the rule)."""
    if cache_cfg.device_memory_bytes is not None:
        return int(cache_cfg.device_memory_bytes)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        # Leave 10% of what remains for activations and the allocator's slack.
        return max(0, int((total * cache_cfg.device_memory_fraction - used) * 0.9))
    return int(min(4 * _GiB, cache_cfg.device_memory_fraction * available_host_bytes() / 4 / local_ranks))


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v), each [num_blocks, block_size, kv_heads, head_dim], zero-filled."""
    shape = (num_layers, 2, num_blocks, block_size, kv_heads, head_dim)
    if device.type == "cpu":
        # An anonymous mapping is zero-filled by the kernel page by page as it is touched, so
        # a large cache costs nothing up front (torch.zeros would write every byte first).
        # NOTE: zeros matter: decode reads padded slots (masked, weight 0); garbage could be NaN.
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = mmap.mmap(-1, nbytes)
        cache = torch.frombuffer(buf, dtype=dtype).view(shape)
    else:
        cache = torch.zeros(shape, dtype=dtype, device=device)
    return [(cache[i, 0], cache[i, 1]) for i in range(num_layers)]
