"""The host KV tier: one buffer per node in shared memory, head-major (HND).

Shape [dp, num_layers, 2, num_kv_heads, num_host_blocks, block_size, head_dim]: for a given
layer and K or V, a TP rank's heads are one contiguous slice, and a block's tokens follow each
other. Prefill offloads each prompt's KV here right after computing it (every rank writes its
layers x heads in the prefill layout); decode swaps sequences back into device blocks (every
rank reads its own layers x heads in the decode layout). A barrier at each layout transition
orders the writes of one layout before the reads of the other.
"""
from __future__ import annotations

import ctypes
import functools
import math
import mmap
from typing import List, Tuple

import torch

from seesaw_mc.model_spec import kv_bytes
from seesaw_mc.worker.device_cache import KVCacheViews, host_kv_budget
from seesaw_mc.worker.node_files import create_exclusive, shm_free_bytes


def num_host_blocks(config, args, layout, dtype: torch.dtype, local_world: int) -> Tuple[int, int]:
    """Host tier size: exact, or a byte budget per node split among its DP replicas; by
    default no more than the shared-memory directory can hold. Returns (blocks per replica,
    bytes the node's replicas write at most)."""
    c = config.cache
    per_block = kv_bytes(args.num_layers, c.block_size, args.num_kv_heads, args.head_dim, dtype.itemsize)
    replicas_here = max(1, min(layout.dp, local_world // (layout.tp * layout.pp)))
    if c.num_host_blocks is not None:
        n = c.num_host_blocks
    else:
        budget = host_kv_budget(c)
        if c.host_memory_bytes is None:  # the default: what RAM allows, and what the tmpfs has free
            budget = min(budget, int(shm_free_bytes() * 0.9))
        n = max(1, budget // replicas_here // per_block)
    return n, n * per_block * replicas_here


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
            with create_exclusive(path) as f:
                f.truncate(nbytes)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        return cls(buf.view(dtype).view(shape), dp_rank)

    def release(self, runs, layer_start: int, num_layers: int, head_start: int, num_heads: int) -> int:
        """Punch the whole pages of these host blocks ((first, count) runs) out of the shared
        file (madvise MADV_REMOVE), for the given layers and heads: a sparse tier takes memory
        only for blocks in use. Returns the bytes released (0 where the file system cannot)."""
        released = 0
        for layer in range(layer_start, layer_start + num_layers):
            for kv in (0, 1):
                for head in range(head_start, head_start + num_heads):
                    chunk = self.t[layer, kv, head]  # [num_blocks, block_size, head_dim], contiguous
                    per_block = chunk[0].numel() * chunk.element_size()
                    for first, n in runs:
                        start = chunk.data_ptr() + first * per_block
                        released += _punch(start, start + n * per_block)
                        if released == 0 and not _PUNCH_WORKS:
                            return 0
        return released

    def copy_out(self, views: KVCacheViews, layer_start: int, head_start: int, pairs, stager=None) -> None:
        """Device -> host for (device_block, host_block) pairs: this rank's layers and heads."""
        h = views.num_kv_heads
        runs, dev_ids, host_ids = split_runs(pairs, stager is None and _on_cpu(views))
        for i, (k, v) in enumerate(views.layers):
            for j, dev in enumerate((k, v)):
                host = self.t[layer_start + i, j, head_start:head_start + h]  # [h, host blocks, bs, d]
                for (d0, h0, n) in runs:
                    # [n, bs, h, d] -> [h, n, bs, d]: heads outermost on the host (HND). From
                    # head-major device blocks (CPU) this copies whole (block, head) tiles; from
                    # token-major ones (CUDA) one head_dim row at a time.
                    if stager is None:
                        host[:, h0:h0 + n].copy_(dev[d0:d0 + n].permute(2, 0, 1, 3))
                    else:
                        stager.to_host(host[:, h0:h0 + n], dev, d0, n)
                if dev_ids is not None:
                    host.index_copy_(1, host_ids, dev.permute(0, 2, 1, 3).index_select(0, dev_ids).transpose(0, 1))
                self.bytes_out += len(pairs) * dev[0].numel() * dev.element_size()
        if stager is not None:
            stager.finish()

    def copy_in(self, views: KVCacheViews, layer_start: int, head_start: int, pairs, stager=None) -> None:
        """Host -> device for (device_block, host_block) pairs: this rank's layers and heads."""
        h = views.num_kv_heads
        runs, dev_ids, host_ids = split_runs(pairs, stager is None and _on_cpu(views))
        for i, (k, v) in enumerate(views.layers):
            for j, dev in enumerate((k, v)):
                host = self.t[layer_start + i, j, head_start:head_start + h]
                for (d0, h0, n) in runs:
                    if stager is None:
                        dev[d0:d0 + n].copy_(host[:, h0:h0 + n].permute(1, 2, 0, 3))
                    else:
                        stager.to_device(dev, d0, n, host[:, h0:h0 + n])
                if dev_ids is not None:
                    dev.permute(0, 2, 1, 3).index_copy_(0, dev_ids, host.index_select(1, host_ids).transpose(0, 1))
                self.bytes_in += len(pairs) * dev[0].numel() * dev.element_size()
        if stager is not None:
            stager.finish()


class Stager:
    """Device <-> host-tier copies through a page-locked staging buffer on a side stream: how
    KV crosses PCIe on CUDA without blocking compute (the host tier itself is pageable shared
    memory, which the GPU cannot DMA from asynchronously).

    The staging buffer comes from DeepSpeed's accelerator (`get_accelerator().pin_memory`,
    the allocation ZeRO-Offload stages through). Per (layer, K|V, run of blocks) chunk: the
    device side transposes to the host tier's HND order on the side stream, DMAs into the staging buffer,
    and the host side copies from there into the shared tier (and the reverse for copy-in),
    in pieces of at most the staging size. On CPU there is nothing to stage (both tiers are
    RAM: a staging copy would double the bytes moved), so the engine copies directly; the
    class still runs on CPU, with a plain buffer and no stream, which is how it is tested.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, staging_bytes: int = 64 << 20,
                 after_compute: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        buf = torch.empty(max(1, staging_bytes // dtype.itemsize), dtype=dtype)
        if self.cuda:
            from deepspeed.accelerator import get_accelerator

            buf = get_accelerator().pin_memory(buf)
            self.stream = torch.cuda.Stream(device)
        else:
            self.stream = None
        self.staging = buf
        self.after_compute = after_compute

    def begin(self) -> None:
        """Call on the compute thread when submitting: the side stream starts after the
        compute issued so far (e.g. the prefill that wrote the KV being offloaded)."""
        if self.cuda and self.after_compute:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def _pieces(self, n: int, per_block: int):
        step = max(1, self.staging.numel() // per_block)
        for a in range(0, n, step):
            yield a, min(n, a + step)

    def to_host(self, dst: torch.Tensor, dev: torch.Tensor, d0: int, n: int) -> None:
        """dst [h, n, bs, d] (host tier) <- dev[d0:d0+n] ([n, bs, h, d])."""
        per_block = dev[0].numel()
        for a, b in self._pieces(n, per_block):
            shape = (dst.shape[0], b - a) + tuple(dst.shape[2:])
            stage = self.staging[: (b - a) * per_block].view(shape)
            with self._on_stream():
                stage.copy_(dev[d0 + a:d0 + b].permute(2, 0, 1, 3), non_blocking=self.cuda)
            self._sync()
            dst[:, a:b].copy_(stage)

    def to_device(self, dev: torch.Tensor, d0: int, n: int, src: torch.Tensor) -> None:
        """dev[d0:d0+n] ([n, bs, h, d]) <- src [h, n, bs, d] (host tier)."""
        per_block = dev[0].numel()
        for a, b in self._pieces(n, per_block):
            self._sync()  # the staging buffer is free again
            shape = (src.shape[0], b - a) + tuple(src.shape[2:])
            stage = self.staging[: (b - a) * per_block].view(shape)
            stage.copy_(src[:, a:b])
            with self._on_stream():
                on_dev = stage.to(self.device, non_blocking=self.cuda) if self.cuda else stage
                dev[d0 + a:d0 + b].copy_(on_dev.permute(1, 2, 0, 3))

    def finish(self) -> None:
        """Everything issued is done: the next step may use the blocks copied in."""
        self._sync()

    def _on_stream(self):
        import contextlib

        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.cuda:
            self.stream.synchronize()


_PAGE = mmap.PAGESIZE
_MADV_REMOVE = 9  # Linux: free a shared mapping's backing pages (tmpfs: a punched hole)
_PUNCH_WORKS = True


def _punch(start: int, end: int) -> int:
    """Release the whole pages inside [start, end) of a shared file mapping; their bytes."""
    global _PUNCH_WORKS
    a, b = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if b <= a or not _PUNCH_WORKS:
        return 0
    if _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_REMOVE) != 0:
        _PUNCH_WORKS = False  # not Linux, or a file system without hole punching: keep the pages
        return 0
    return b - a


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


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


def _on_cpu(views: KVCacheViews) -> bool:
    return all(k.device.type == "cpu" for k, _ in views.layers)


SHORT_RUN = 6
"""Runs shorter than this many blocks are copied together, by index, not one copy each. Measured
(CPU, 1 thread, 8 layers x K|V, 2 heads, 8 KiB per block and layer): a strided copy per run costs
about 27 us plus 1.9 us a block, gathering and scattering by index 6.4 us a block; 1,000 scattered
blocks took 459 ms one run at a time, 114 ms by index (`copy_in`)."""


def split_runs(pairs, by_index: bool):
    """(runs to copy one by one, device ids, host ids to copy by index, or None and None)."""
    runs = block_runs(pairs)
    if not by_index:
        return runs, None, None
    short = [r for r in runs if r[2] < SHORT_RUN]
    if len(short) < 2:
        return runs, None, None
    dev_ids = torch.tensor([d + k for d, _, n in short for k in range(n)])
    host_ids = torch.tensor([h + k for _, h, n in short for k in range(n)])
    return [r for r in runs if r[2] >= SHORT_RUN], dev_ids, host_ids
