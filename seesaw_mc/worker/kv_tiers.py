"""A rank's two KV tiers and the copies between them: the device cache (one view per
layout, bound to that layout's attention layers), the node's host tier, and the copies
that move KV, synchronous or in the background under copy tickets.

The ticket rule (core/block_manager.py): the scheduler releases the blocks of a background
copy only when it tells a step to wait for the copy's ticket (StepPlan.wait_for), and this
class finishes exactly those copies, on every rank, before that step copies or computes.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch

from seesaw_mc.model.attention import kv_head_major
from seesaw_mc.worker.device_cache import DeviceKVBuffer, KVCacheViews, min_over_ranks
from seesaw_mc.worker.host_tier import HostKVBuffer, Stager, num_host_blocks
from seesaw_mc.worker.node_files import node_shared, require_shm, shm_free_bytes

_KINDS = ("offload", "prefetch", "swap_in", "swap_out")


class KVTiers:
    def __init__(self, config, args, dtype: torch.dtype, device: torch.device, groups: dict, models: dict,
                 num_blocks: int, buffer: DeviceKVBuffer, job: str, local_world: int):
        self.groups = groups
        self.num_blocks = num_blocks
        self.buffer = buffer
        self.views: Dict[str, KVCacheViews] = {}
        head_major = kv_head_major(device, args.head_dim)
        for name, g in groups.items():
            views = buffer.views(g.layer_end - g.layer_start, num_blocks, config.cache.block_size,
                                 args.num_kv_heads // g.layout.tp, args.head_dim, dtype, head_major)
            self.views[name] = views
            for layer, kv in zip(models[name].decoder.layers, views.layers):
                layer.self_attention.kv_cache = kv
        self.layout = "prefill"  # whose view the copies use: the runner's active layout
        self.num_host_blocks = 0
        self.host: Optional[HostKVBuffer] = None
        self.stager: Optional[Stager] = None
        if len({str(g.layout) for g in groups.values()}) > 1:
            self._open_host(config, args, dtype, job, local_world)
            # CUDA: KV crosses PCIe through a pinned staging buffer on a side stream; on CPU both
            # tiers are RAM and copies go direct.
            if device.type == "cuda":
                self.stager = Stager(device, dtype)
        self._copier: Optional[ThreadPoolExecutor] = None
        self._pending: Dict[int, Tuple[str, Future]] = {}  # ticket -> background copy, oldest first
        self.stats = {f"{k}_s": 0.0 for k in _KINDS}
        self.stats.update({f"{k}_wait_s": 0.0 for k in ("offload", "prefetch")})
        self.stats.update({f"{k}_blocks": 0 for k in _KINDS})
        self.stats["host_released_bytes"] = 0

    def _open_host(self, config, args, dtype, job: str, local_world: int) -> None:
        g = self.groups["prefill"]
        n, need = num_host_blocks(config, args, g.layout, dtype, local_world)
        # Each rank reads MemAvailable at its own moment; but the file's shape (local rank 0's)
        # and every rank's view of it (HND strides depend on the count) must agree, and so
        # must the leader's block ids: all ranks take the smallest count.
        self.num_host_blocks = n if config.cache.num_host_blocks is not None else min_over_ranks(n)
        # Every rank judges by the same figure, so that all fail alike or none does.
        require_shm(need * self.num_host_blocks // n, f"the host KV tier ({self.num_host_blocks} blocks)",
                    "a smaller --host-memory-bytes or --num-host-blocks", free=min_over_ranks(shm_free_bytes()))
        shape = HostKVBuffer.shape(g.layout.dp, args.num_layers, args.num_kv_heads, self.num_host_blocks,
                                   config.cache.block_size, args.head_dim)
        self.host = node_shared(
            job, "kv", lambda path: HostKVBuffer.open(path, shape, dtype, 0, create=True),
            lambda path: HostKVBuffer.open(path, shape, dtype, g.dp_rank, create=False))

    def _slice(self):
        g, views = self.groups[self.layout], self.views[self.layout]
        return views, g.layer_start, g.tp_rank * views.num_kv_heads

    def release_host(self, runs) -> None:
        """Give the pages of free host blocks (runs) back to the OS, for this rank's layers and
        heads in the active layout. Called between a transition's drain and its barrier: every
        rank's copies into them are done, and nothing writes them before the barrier."""
        if runs and self.host is not None:
            views, layer_start, head_start = self._slice()
            self.stats["host_released_bytes"] += self.host.release(
                runs, layer_start, len(views.layers), head_start, views.num_kv_heads)

    # -- copies before a step -----------------------------------------------------------
    def swap_out(self, pairs) -> None:
        """Device -> host tier for (device_block, host_block) pairs, in the active layout, now."""
        self._now("swap_out", self.host.copy_out if pairs else None, pairs)

    def swap_in(self, pairs) -> None:
        """Host tier -> device for (device_block, host_block) pairs, in the active layout, now."""
        self._now("swap_in", self.host.copy_in if pairs else None, pairs)

    def _now(self, kind: str, copy, pairs) -> None:
        if not pairs:
            return
        # The scheduler never plans one while a background copy is pending (a step waits for
        # every copy but a prefill's offload, and swaps happen in decode or at its end); direct
        # callers get the same guarantee here, as the copies share the Stager's buffer.
        self.wait_all()
        t = time.perf_counter()
        self._begin_staged()
        copy(*self._slice(), pairs, stager=self.stager)
        self.stats[f"{kind}_s"] += time.perf_counter() - t
        self.stats[f"{kind}_blocks"] += len(pairs)

    # -- background copies --------------------------------------------------------------
    def offload(self, pairs, ticket: Optional[int]) -> None:
        """Prefill's KV -> host tier behind the next step (the blocks stay held by `ticket`)."""
        self._background("offload", self.host.copy_out if pairs else None, pairs, ticket)

    def prefetch(self, pairs, ticket: Optional[int]) -> None:
        """Host tier -> device while this decode step computes, into blocks it does not use."""
        self._background("prefetch", self.host.copy_in if pairs else None, pairs, ticket)

    def _background(self, kind: str, copy, pairs, ticket: Optional[int]) -> None:
        if not pairs:
            return
        if self._copier is None:
            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-kv-copy")
        views = self._slice()
        self._begin_staged()  # on CUDA the side stream starts after the compute issued so far

        def run():
            t = time.perf_counter()
            copy(*views, pairs, stager=self.stager)
            return time.perf_counter() - t

        self._pending[ticket] = (kind, self._copier.submit(run))
        self.stats[f"{kind}_blocks"] += len(pairs)

    def wait(self, tickets: List[int]) -> None:
        """Finish the background copies of these tickets."""
        for t in tickets:
            if t in self._pending:
                self._finish(t)

    def wait_all(self) -> None:
        for t in list(self._pending):
            self._finish(t)

    def _finish(self, ticket: int) -> None:
        kind, fut = self._pending.pop(ticket)
        t = time.perf_counter()
        self.stats[f"{kind}_s"] += fut.result()
        self.stats[f"{kind}_wait_s"] += time.perf_counter() - t

    def _begin_staged(self) -> None:
        if self.stager is not None:
            self.stager.begin()

    def summary(self, since: Optional[dict] = None) -> dict:
        """Copy times and bytes between the tiers (since an earlier summary) and how much of
        the time compute hid: background copies count as hidden except for the time a step
        waited for them; copies made before a step (swap-outs, the first swap-in of a decode
        phase) are not hidden."""
        self.wait_all()
        hk = self.host
        st = dict(self.stats, bytes_to_host=hk.bytes_out if hk else 0, bytes_from_host=hk.bytes_in if hk else 0)
        if since:
            st = {k: v - since[k] for k, v in st.items()}
        background = st["offload_s"] + st["prefetch_s"]
        exposed = st["offload_wait_s"] + st["prefetch_wait_s"] + st["swap_in_s"] + st["swap_out_s"]
        total = background + st["swap_in_s"] + st["swap_out_s"]
        st["swap_hidden"] = 1 - exposed / total if total else None
        st["offload_hidden"] = 1 - st["offload_wait_s"] / st["offload_s"] if st["offload_s"] else None
        st["prefetch_hidden"] = 1 - st["prefetch_wait_s"] / st["prefetch_s"] if st["prefetch_s"] else None
        return st
