"""Weights: the host master copy of the full Megatron-named tensors, shared by the ranks of a
node. A layout's TP shards are cut from it by model/sharding.py; re-sharding to another layout
means cutting them again with the new (tp_rank, tp_size).
"""
from __future__ import annotations

import os
import tempfile

import torch


class MasterWeights:
    """The host master copy: full Megatron-named tensors in one file per node, mapped shared.

    Local rank 0 of each node converts the checkpoint once into a flat file under /dev/shm
    (linear_fc1 stored as interleaved [gate_c; up_c] pairs, see sharding.interleave_fc1);
    every rank on the node maps it (MAP_SHARED), so N ranks hold the weights once, not N
    times. Shards are views into the mapping wherever the slice is a strided view of the full
    tensor, which with the interleaved fc1 is every tensor: a re-shard copies no weight bytes
    (unless ffn_hidden_size does not divide evenly, or the vocabulary needs padding). The file
    is unlinked as soon as every local rank has mapped it: nothing is left in /dev/shm, even
    after a crash.
    """

    ALIGN = 64

    def __init__(self, index: dict, buf: torch.Tensor):
        self.index = index
        self._buf = buf
        self.nbytes = buf.numel()
        self.pinned = False

    def pin(self) -> bool:
        """CUDA: page-lock the shared mapping in place (cudaHostRegister), so that shard
        copies to the GPU are asynchronous DMA. Best effort: False leaves it pageable (copies
        are then synchronous, still correct)."""
        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        try:
            err = torch.cuda.cudart().cudaHostRegister(self._buf.data_ptr(), self.nbytes, 0)
            self.pinned = int(err) == 0
        except (AttributeError, RuntimeError, TypeError):
            self.pinned = False
        return self.pinned

    def tensors(self):
        for name, (dtype, shape, off, n) in self.index.items():
            yield name, self._buf[off:off + n].view(getattr(torch, dtype)).view(shape)

    @staticmethod
    def write(path: str, tensors, dtype: torch.dtype) -> dict:
        index, off = {}, 0
        with open(path, "wb") as f:
            for name, t in tensors:
                t = t.to(dtype).contiguous()
                raw = t.view(torch.uint8).reshape(-1)
                pad = (-off) % MasterWeights.ALIGN
                f.write(b"\0" * pad)
                off += pad
                f.write(raw.numpy().data)
                index[name] = (str(dtype).replace("torch.", ""), list(t.shape), off, raw.numel())
                off += raw.numel()
        return index

    @classmethod
    def open(cls, path: str, index: dict) -> "MasterWeights":
        size = os.path.getsize(path)
        buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        return cls(index, buf)


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
