"""The host KV tier: one buffer per node in shared memory, head-major (HND).

Shape [dp, num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]: for a given layer
and K or V, a TP rank's heads are one contiguous slice, and a block's tokens follow each
other. Block ids are the same as the device cache's (the block manager is layout-agnostic),
so handing sequences from one layout to another is: every rank of the old layout writes its
(layers, heads) of the blocks, a barrier, every rank of the new layout reads its own.
"""
from __future__ import annotations

import os

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

    def stage_out(self, views: KVCacheViews, layer_start: int, head_start: int, block_ids: torch.Tensor) -> None:
        """Device blocks of this rank's layers/heads -> host (HND)."""
        h = views.num_kv_heads
        for i, (k, v) in enumerate(views.layers):
            for j, dev in enumerate((k, v)):
                src = dev.index_select(0, block_ids).permute(2, 0, 1, 3)  # [h, n, bs, d]
                self.t[layer_start + i, j, head_start:head_start + h].index_copy_(1, block_ids, src)
                self.bytes_out += src.numel() * src.element_size()

    def stage_in(self, views: KVCacheViews, layer_start: int, head_start: int, block_ids: torch.Tensor) -> None:
        """Host (HND) -> device blocks of this rank's layers/heads."""
        h = views.num_kv_heads
        for i, (k, v) in enumerate(views.layers):
            for j, dev in enumerate((k, v)):
                src = self.t[layer_start + i, j, head_start:head_start + h].index_select(1, block_ids)
                dev.index_copy_(0, block_ids, src.permute(1, 2, 0, 3))
                self.bytes_in += src.numel() * src.element_size()


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
