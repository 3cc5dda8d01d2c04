"""The host KV tier: one buffer per node in shared memory, head-major (HND).

Shape [dp, num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]: for a given layer
and K or V, a TP rank's heads are one contiguous slice, and a block's tokens follow each
other. Block ids are the same as the device cache's (the block manager is layout-agnostic),
so handing sequences from one layout to another is: every rank of the old layout writes its
(layers, heads) of the blocks, a barrier, every rank of the new layout reads its own.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch

from seesaw_mc.kv.paged_cache import KVCacheViews


class HostKVBuffer:
    def __init__(self, tensor: torch.Tensor, dp_rank: int):
        self.full = tensor
        self.t = tensor[dp_rank]
        self.bytes_out = 0
        self.bytes_in = 0

    @staticmethod
    def shape(dp: int, num_layers: int, kv_heads: int, num_blocks: int, block_size: int, head_dim: int):
        return (dp, num_layers, 2, kv_heads, num_blocks, block_size, head_dim)

    @classmethod
    def open(cls, path: str, shape, dtype: torch.dtype, dp_rank: int, create: bool) -> "HostKVBuffer":
        nbytes = 1
        for s in shape:
            nbytes *= s
        nbytes *= torch.empty((), dtype=dtype).element_size()
        if create:
            # Sparse file in shared memory: pages exist only once written.
            with open(path, "wb") as f:
                f.truncate(nbytes)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return cls(buf.view(dtype).view(shape), dp_rank)

    def stage_out(self, views: KVCacheViews, layer_start: int, head_start: int, block_ids) -> None:
        """Device blocks of this rank's layers/heads -> host (HND)."""
        h = views.num_kv_heads
        for a, b in block_runs(block_ids):
            for i, (k, v) in enumerate(views.layers):
                for j, dev in enumerate((k, v)):
                    # One strided copy per run of consecutive blocks: [n, bs, h, d] -> [h, n, bs, d].
                    # NOTE: this transposition runs at about 1/3 of memcpy speed on CPU; a
                    # head-major device cache would avoid it but makes decode's block gather
                    # 3x slower (measured), and decode steps far outnumber transitions.
                    self.t[layer_start + i, j, head_start:head_start + h, a:b].copy_(dev[a:b].permute(2, 0, 1, 3))
                    self.bytes_out += (b - a) * dev[0].numel() * dev.element_size()

    def stage_in(self, views: KVCacheViews, layer_start: int, head_start: int, block_ids) -> None:
        """Host (HND) -> device blocks of this rank's layers/heads."""
        h = views.num_kv_heads
        for a, b in block_runs(block_ids):
            for i, (k, v) in enumerate(views.layers):
                for j, dev in enumerate((k, v)):
                    dev[a:b].copy_(self.t[layer_start + i, j, head_start:head_start + h, a:b].permute(1, 2, 0, 3))
                    self.bytes_in += (b - a) * dev[0].numel() * dev.element_size()


def block_runs(block_ids) -> List[Tuple[int, int]]:
    """Sorted block ids -> half-open runs of consecutive ids (the allocator hands out runs)."""
    runs: List[Tuple[int, int]] = []
    for b in sorted(set(int(x) for x in block_ids)):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
