"""Weights: full (master) Megatron-named tensors -> this rank's shard for a TP degree.

Each rule narrows a full tensor to the slice a TP rank owns, the same way megatron-core's
column/row/vocab-parallel layers partition it. Re-sharding to another layout means running
the rules again with the new (tp_rank, tp_size): see `shard_tensor`.
"""
from __future__ import annotations

import math
import os
import tempfile

import torch


def _row(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=1)[rank]


def _qkv(full: torch.Tensor, rank: int, size: int, num_groups: int) -> torch.Tensor:
    # Rows are packed per query group; a TP rank owns whole groups.
    grouped = full.reshape(num_groups, -1, *full.shape[1:])
    return grouped.chunk(size, dim=0)[rank].reshape(-1, *full.shape[1:])


def _fc1(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    # Full tensor is [gate; up]; a rank's shard is [gate_r; up_r] (a copy).
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def fc1_interleave_factor(ffn_hidden_size: int, tp_degrees) -> int:
    """How many [gate_c; up_c] pairs the master fc1 is stored as: the lcm of the layouts' TP
    degrees, so that every layout's TP shard is a contiguous run of pairs (a view)."""
    m = 1
    for t in tp_degrees:
        m = m * t // math.gcd(m, t)
    return m if ffn_hidden_size % m == 0 else 1


def interleave_fc1(full: torch.Tensor, pairs: int) -> torch.Tensor:
    """[gate; up] -> [gate_0; up_0; gate_1; up_1; ...] with `pairs` chunks each."""
    if pairs == 1:
        return full
    gate, up = full.chunk(2, dim=0)
    rest = full.shape[1:]
    return torch.stack([gate.reshape(pairs, -1, *rest), up.reshape(pairs, -1, *rest)], dim=1).reshape(full.shape)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _vocab(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    padded = padded_vocab_size(full.shape[0], size)
    if padded != full.shape[0]:
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    return full.chunk(size, dim=0)[rank]


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, num_kv_heads: int,
                 fc1_pairs: int = 1) -> torch.Tensor:
    """The TP shard of a full Megatron-named tensor (a view when tp_size == 1). fc1_pairs: how
    the master linear_fc1 is interleaved (see interleave_fc1)."""
    if tp_size == 1:
        return full
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return _qkv(full, tp_rank, tp_size, num_kv_heads)
    if name.endswith("linear_fc1.weight"):
        if fc1_pairs % tp_size == 0 and fc1_pairs > 1:
            return full.chunk(tp_size, dim=0)[tp_rank]  # whole pairs: a view
        return _fc1(full, tp_rank, tp_size)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return _row(full, tp_rank, tp_size)
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return _vocab(full, tp_rank, tp_size)
    if name.endswith("layernorm.weight"):
        return full
    raise KeyError(f"no sharding rule for {name}")


class MasterWeights:
    """The host master copy: full Megatron-named tensors in one file per node, mapped shared.

    Local rank 0 of each node converts the checkpoint once into a flat file under /dev/shm
    (linear_fc1 stored as interleaved [gate_c; up_c] pairs, see interleave_fc1);
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
