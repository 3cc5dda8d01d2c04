"""The device KV tier: one flat buffer per rank, sized from a memory budget, viewed in the
shape of each layout."""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist

from seesaw_mc.errors import CapacityError
from seesaw_mc.model_spec import ModelShape, kv_bytes

_GiB = 1 << 30


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * _GiB


def device_kv_budget(cache_cfg, device: torch.device, shard_bytes: float = 0.0, resident_bytes: float = 0.0) -> int:
    """Bytes the device KV tier may use (see CacheConfig for the rule). `shard_bytes`: the
    largest weight shard a rank holds in any layout; `resident_bytes`: the weights on the
    device now (one layout's shard: a transition swaps it for the other's)."""
    if cache_cfg.device_memory_bytes is not None:
        return int(cache_cfg.device_memory_bytes)
    if cache_cfg.device_capacity_bytes is not None:
        return max(0, int(cache_cfg.device_capacity_bytes * cache_cfg.device_memory_fraction - shard_bytes))
    from seesaw_mc.parallel.megatron_adapter import local_world_size

    local_ranks = max(1, local_world_size(1))
    if device.type == "cuda":
        # megatron-core's placeholder weights were released: hand their cached blocks back to the
        # device first, or mem_get_info counts them as used.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        others = (total - free) - resident_bytes  # all but the weights now loaded
        # Whichever layout is active, its shard must fit next to the KV: count the largest.
        # Leave 10% of what remains for activations and the allocator's slack.
        return max(0, int((total * cache_cfg.device_memory_fraction - others - shard_bytes) * 0.9))
    # The CPU "device" shares RAM with the weights, the host tier and everything else.
    return int(min(1 * _GiB, cache_cfg.device_memory_fraction * available_host_bytes() / 4) / local_ranks)


@dataclass
class KVCacheViews:
    """One layout's view of a rank's KV buffer: per local layer (k, v), each indexed
    [num_blocks, block_size, kv_heads, head_dim] whatever the layout in memory (see
    `DeviceKVBuffer.views`)."""

    layers: List[Tuple[torch.Tensor, torch.Tensor]]
    num_kv_heads: int


class DeviceKVBuffer:
    """A rank's device KV memory: one flat buffer, viewed in the shape of whichever layout is
    active. Block ids mean the same in every layout, so the block manager never changes."""

    def __init__(self, nbytes: int, device: torch.device):
        if device.type == "cpu":
            # An anonymous mapping is zero-filled by the kernel page by page as it is touched,
            # so a large cache costs nothing up front (torch.zeros would write every byte).
            # NOTE: zeros matter: decode reads padded slots (masked, weight 0); garbage could be NaN.
            self._mmap = mmap.mmap(-1, max(nbytes, 1))
            self.buf = torch.frombuffer(self._mmap, dtype=torch.uint8)
        else:
            self.buf = torch.zeros(max(nbytes, 1), dtype=torch.uint8, device=device)

    def views(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, head_major: bool = False) -> KVCacheViews:
        """Per layer (k, v), indexed [block, offset, head, dim]. In memory a block is either
        token-major ([block_size, kv_heads, head_dim], so that a flat slot index reaches a token:
        what FlexAttention needs) or, with `head_major`, [kv_heads, block_size, head_dim]: each
        (block, head) tile of K or V is one contiguous run, which the CPU op reads 1.5x faster
        (see model/attention.py) and which the host tier (heads outermost) copies in runs of a
        tile instead of one head_dim row."""
        inner = (kv_heads, block_size, head_dim) if head_major else (block_size, kv_heads, head_dim)
        shape = (num_layers, 2, num_blocks) + inner
        n = math.prod(shape) * dtype.itemsize
        cache = self.buf[:n].view(dtype).view(shape)
        if head_major:
            cache = cache.transpose(3, 4)
        return KVCacheViews([(cache[i, 0], cache[i, 1]) for i in range(num_layers)], kv_heads)


def min_over_ranks(n: int) -> int:
    """The smallest `n` of all ranks (collective): a size every rank must agree on."""
    if dist.get_world_size() > 1:
        from seesaw_mc.parallel.megatron_adapter import control_group

        t = torch.tensor([n], dtype=torch.long)  # a CPU tensor: over the gloo control group
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
        n = int(t.item())
    return n


def host_kv_budget(cache_cfg) -> int:
    """Bytes of the host KV tier per node (see CacheConfig.host_memory_bytes)."""
    if cache_cfg.host_memory_bytes is not None:
        return int(cache_cfg.host_memory_bytes)
    return int(cache_cfg.host_memory_fraction * available_host_bytes())


def allocate_device_kv(config, args, groups: dict, dtype: torch.dtype, device: torch.device,
                       max_model_len: int, resident_bytes: int = 0) -> Tuple[int, DeviceKVBuffer]:
    """The device tier's block count (the same on every rank: MIN over the world) and buffer,
    big enough for the block shape of every layout in `groups`; `resident_bytes`: the weights
    loaded on the device now."""
    c = config.cache
    per_block = {n: kv_bytes(g.layer_end - g.layer_start, c.block_size, args.num_kv_heads // g.layout.tp,
                             args.head_dim, dtype.itemsize)
                 for n, g in groups.items()}
    if c.num_device_blocks is not None:
        n = c.num_device_blocks
    else:
        shape = ModelShape.from_model_args(args, dtype.itemsize)
        budget = device_kv_budget(c, device, max(shape.shard_bytes(g.layout) for g in groups.values()),
                                  resident_bytes)
        most = config.scheduler.max_num_seqs * (-(-max_model_len // c.block_size))
        n = min(min(budget // b for b in per_block.values()), most)
        n = min_over_ranks(n)
        if n < 1:
            raise CapacityError(f"KV cache budget of {budget} bytes holds no {c.block_size}-token block "
                                f"({max(per_block.values())} bytes each); raise kv_cache_memory_bytes")
    return n, DeviceKVBuffer(n * max(per_block.values()), device)
