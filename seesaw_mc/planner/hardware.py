"""The devices the planner plans for: paper presets (A10, L4, A100, H100) and "this machine",
a CPU rank measured on the spot as if it were a device."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from seesaw_mc.errors import ConfigError

GiB = 2 ** 30
GLOO_LINK = (0.9e9, 3e-4)
"""Loopback gloo between CPU ranks (bytes/s, s per hop): large all-reduces ran at about 0.9 GB/s
on these machines, and benchmarks/results/allreduce.txt has a 4 KB all-reduce of 2 ranks at
632 us = 2 hops."""
SHM_LINK = (4.8e9, 1.6e-6)
"""DeepSpeed's shared-memory all-reduce on one host (benchmarks/results/allreduce.txt: 16 MB at 4.8 GB/s, 4 KB in 3.2 us)."""


@dataclass(frozen=True)
class Hardware:
    """One device and its links. Rates are effective (what a kernel or a collective gets)."""

    name: str
    flops: float
    """Dense matmul FLOP/s of one device at the serving dtype."""
    mem_bw: float
    """Bytes/s one device reads its weights and KV at."""
    mem_bytes: float
    """Memory of one device (weights + KV + activations)."""
    link_bw: float
    """Bytes/s one device sends to its peers in a collective (PCIe, NVLink, network)."""
    link_latency: float
    """Seconds per collective hop."""
    host_bw: float
    """Bytes/s between one device and host memory (KV swaps, re-sharding)."""
    host_mem_bytes: float = 512 * GiB
    """Host memory of a node; the host KV tier takes host_kv_fraction of it."""
    mfu: float = 0.6
    """Share of `flops` prefill reaches."""
    mem_util: float = 0.9
    """Share of `mem_bytes` the engine may use (vLLM's gpu_memory_utilization)."""
    gpus_per_node: int = 8
    host_kv_fraction: float = 0.5
    transition_overhead_s: float = 0.05
    """Pipeline drain, barriers and bookkeeping per layout switch."""


_PCIE4 = 16 * GiB  # PCIe 4.0 x16, the A10's link in the paper
_PCIE5 = 32 * GiB
HARDWARE_PRESETS: Dict[str, Hardware] = {
    "A10": Hardware("A10", 125e12, 600e9, 24 * GiB, _PCIE4, 15e-6, _PCIE4),
    "L4": Hardware("L4", 121e12, 300e9, 24 * GiB, _PCIE4, 15e-6, _PCIE4),
    "A100-PCIe": Hardware("A100-PCIe", 312e12, 1935e9, 80 * GiB, _PCIE4, 15e-6, _PCIE4),
    "A100-SXM": Hardware("A100-SXM", 312e12, 2039e9, 80 * GiB, 230e9, 8e-6, _PCIE4),
    "H100-PCIe": Hardware("H100-PCIe", 756e12, 2000e9, 80 * GiB, _PCIE5, 12e-6, _PCIE5),
    "H100-SXM": Hardware("H100-SXM", 989e12, 3350e9, 80 * GiB, 360e9, 6e-6, _PCIE5),
}


# ---- "this machine", measured on the spot ---------------------------------------------------------
def matmul_flops(threads: int = 1, n: int = 1024, reps: int = 4) -> float:
    """fp32 matmul FLOP/s on `threads` threads: best of 3."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 * reps / best


def measure_machine(threads: int = 1, ranks: int = 1, link_bw: Optional[float] = None,
                    link_latency: Optional[float] = None, mem_bytes: Optional[float] = None) -> Hardware:
    """A CPU rank as a device: matmul FLOP/s and copy bandwidth measured here with `threads`
    threads; the link is loopback gloo (GLOO_LINK) unless given."""
    import torch

    flops = matmul_flops(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.empty(64 * 2 ** 20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        bw = 2 * src.numel() * 4 / best  # read + write
    finally:
        torch.set_num_threads(old)
    from seesaw_mc.worker.device_cache import available_host_bytes

    avail = available_host_bytes()
    return Hardware(name=f"this machine ({threads} thread{'s' if threads > 1 else ''}/rank)", flops=flops,
                    mem_bw=bw / max(1, ranks) ** 0.5, mem_bytes=mem_bytes or avail / max(1, ranks),
                    link_bw=link_bw or GLOO_LINK[0],
                    link_latency=link_latency if link_latency is not None else GLOO_LINK[1],
                    host_bw=bw, host_mem_bytes=avail, mfu=1.0, mem_util=0.9, gpus_per_node=max(1, ranks),
                    host_kv_fraction=0.25, transition_overhead_s=0.02)


def measure_link(group=None, calls: int = 10, big_bytes: int = 2 ** 20) -> Tuple[float, float]:
    """(bytes/s, seconds per hop) of the all-reduce between the ranks of `group` (default: all),
    timed on the spot in the terms of CostModel.allreduce_s: a 4-byte all-reduce costs 2(n-1)
    hops, a big one adds 2(n-1)/n of its bytes over the rate. Collective: every rank calls it;
    the figures are this rank's (median of `calls` small ones, best of 3 big ones)."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    if n <= 1:
        return GLOO_LINK
    small, big = torch.zeros(1), torch.zeros(big_bytes // 4)
    for _ in range(3):
        dist.all_reduce(small, group=group)
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        dist.all_reduce(small, group=group)
        ts.append(time.perf_counter() - t)
    hop = sorted(ts)[len(ts) // 2] / (2 * (n - 1))
    dist.all_reduce(big, group=group)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        dist.all_reduce(big, group=group)
        best = min(best, time.perf_counter() - t)
    wire = max(best - 2 * (n - 1) * hop, 1e-9)
    return 2 * (n - 1) / n * big_bytes / wire, hop


def resolve_hardware(spec: str, world: int, threads: int = 1, **measured_kw) -> Hardware:
    for name, hw in HARDWARE_PRESETS.items():
        if spec.lower() == name.lower():
            return hw
    if spec in ("measured", "this-machine", "cpu"):
        return measure_machine(threads=threads, ranks=world, **measured_kw)
    raise ConfigError(f"unknown hardware {spec!r}: one of {', '.join(HARDWARE_PRESETS)}, measured")
