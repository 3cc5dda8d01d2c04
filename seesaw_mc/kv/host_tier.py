"""The host KV tier: one buffer per node in shared memory, head-major (HND).

Shape [dp, num_layers, 2, num_kv_heads, num_host_blocks, block_size, head_dim]: for a given
layer and K or V, a TP rank's heads are one contiguous slice, and a block's tokens follow each
other. Prefill offloads each prompt's KV here right after computing it (every rank writes its
layers x heads in the prefill layout); decode swaps sequences back into device blocks (every
rank reads its own layers x heads in the decode layout). A barrier at each layout transition
orders the writes of one layout before the reads of the other.
"""
from __future__ import annotations

import math
import os
from typing import List, Tuple

import torch

from seesaw_mc.kv.paged_cache import KVCacheViews


class HostKVBuffer:
    def __init__(self, tensor: torch.Tensor, dp_rank: int):
        self.t = tensor[dp_rank]  # this DP replica's part (keeps the mapping alive)
        self.bytes_out = 0
        self.bytes_in = 0

    @staticmethod
    def shape(dp: int, num_layers: int, kv_heads: int, num_blocks: int, block_size: int, head_dim: int):
        return (dp, num_layers, 2, kv_heads, num_blocks, block_size, head_dim)

    @classmethod
    def open(cls, path: str, shape, dtype: torch.dtype, dp_rank: int, create: bool) -> "HostKVBuffer":
        nbytes = math.prod(shape) * dtype.itemsize
        if create:
            # Sparse file in shared memory: pages exist only once written.
            with open(path, "wb") as f:
                f.truncate(nbytes)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return cls(buf.view(dtype).view(shape), dp_rank)

    def copy_out(self, views: KVCacheViews, layer_start: int, head_start: int, pairs) -> None:
        """Device -> host for (device_block, host_block) pairs: this rank's layers and heads."""
        h = views.num_kv_heads
        for (d0, h0, n) in block_runs(pairs):
            for i, (k, v) in enumerate(views.layers):
                for j, dev in enumerate((k, v)):
                    # [n, bs, h, d] -> [h, n, bs, d]: heads outermost on the host (HND).
                    # NOTE: this transposition runs at ~1/2-1/3 of memcpy speed on CPU; a
                    # head-major device cache would avoid it but makes decode's block gather
                    # 3x slower (measured), and decode steps far outnumber swaps.
                    self.t[layer_start + i, j, head_start:head_start + h, h0:h0 + n].copy_(
                        dev[d0:d0 + n].permute(2, 0, 1, 3))
                    self.bytes_out += n * dev[0].numel() * dev.element_size()

    def copy_in(self, views: KVCacheViews, layer_start: int, head_start: int, pairs) -> None:
        """Host -> device for (device_block, host_block) pairs: this rank's layers and heads."""
        h = views.num_kv_heads
        for (d0, h0, n) in block_runs(pairs):
            for i, (k, v) in enumerate(views.layers):
                for j, dev in enumerate((k, v)):
                    dev[d0:d0 + n].copy_(self.t[layer_start + i, j, head_start:head_start + h, h0:h0 + n]
                                         .permute(1, 2, 0, 3))
                    self.bytes_in += n * dev[0].numel() * dev.element_size()


def block_runs(pairs) -> List[Tuple[int, int, int]]:
    """(device, host) block pairs -> runs (device_start, host_start, length) where both ids
    are consecutive: one strided copy per run instead of one per block."""
    runs: List[List[int]] = []
    for d, h in sorted((int(a), int(b)) for a, b in pairs):
        if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == h:
            runs[-1][2] += 1
        else:
            runs.append([d, h, 1])
    return [tuple(r) for r in runs]


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
