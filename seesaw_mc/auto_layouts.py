"""The planner as the CLI uses it: the hardware flags that `seesaw-mc plan` and
`generate --layouts auto` share, and the layouts chosen for a batch job's own input."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from seesaw_mc.driver import on_rank0
from seesaw_mc.errors import SeesawError


def add_hardware_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan-threads", type=int, default=None,
                   help="measured hardware: threads per rank (default OMP_NUM_THREADS or 1)")
    p.add_argument("--link-mbit", type=float, default=None,
                   help="measured hardware: link rate between ranks in Mbit/s (default: loopback gloo)")
    p.add_argument("--link-latency-us", type=float, default=None,
                   help="measured hardware: seconds per collective hop, in microseconds")


def hardware_from_args(a, spec: str, world: int, shm_link: bool = False):
    from seesaw_mc.planner import SHM_LINK, resolve_hardware

    threads = a.plan_threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    bw, lat = SHM_LINK if shm_link else (None, None)
    if a.link_mbit:
        bw = a.link_mbit * 1e6 / 8
    if a.link_latency_us is not None:
        lat = a.link_latency_us * 1e-6
    cap = a.emulate_device_gib
    return resolve_hardware(spec, world, threads=threads, link_bw=bw, link_latency=lat,
                            mem_bytes=cap * 2**30 if cap else None)


def auto_layouts(a, specs) -> str:
    """--layouts auto: rank 0 plans for this input on the launched ranks; every rank gets its answer."""
    from seesaw_mc.parallel import megatron_adapter as mc

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return "tp1"
    mc.init_distributed(timeout_s=a.collective_timeout)
    link = _measure_link(a, world)
    return on_rank0(lambda: _plan(a, specs, world, link))


def _measure_link(a, world: int):
    """The launched ranks' all-reduce rate and latency, timed on the spot (every rank takes part),
    unless the planner is told them, assumes a preset's, or the ranks share a node's memory."""
    from seesaw_mc.config import AllReduce
    from seesaw_mc.parallel import megatron_adapter as mc
    from seesaw_mc.parallel.deepspeed_ops import choose_allreduce
    from seesaw_mc.planner import measure_link

    if a.plan_hardware not in ("measured", "this-machine", "cpu") or a.link_mbit or a.link_latency_us is not None:
        return None
    if mc.HAS_CUDA:  # "measured" is a CPU rank's figures; NCCL ranks take a preset or --link-mbit
        return None
    local = mc.local_world_size(world)
    if choose_allreduce(a.allreduce, mc.HAS_CUDA, world, local, (world,)) is AllReduce.DEEPSPEED_SHM:
        return None
    return measure_link()


def _plan(a, specs, world: int, link=None) -> str:
    from seesaw_mc import planner
    from seesaw_mc.config import AllReduce
    from seesaw_mc.parallel import megatron_adapter as mc
    from seesaw_mc.parallel.deepspeed_ops import choose_allreduce

    if not specs:
        raise SeesawError("--layouts auto: no valid request to plan for")
    wl = planner.Workload(os.path.basename(a.input), tuple(
        (len(s.prompt_token_ids), s.params.max_tokens or a.max_tokens) for s in specs),
        planner.shared_prefix_tokens([s.prompt_token_ids for s in specs], a.block_size) if a.enable_prefix_caching
        else 0.0)
    local = mc.local_world_size(world)
    shm = choose_allreduce(a.allreduce, mc.HAS_CUDA, world, local, (world,)) is AllReduce.DEEPSPEED_SHM
    hw = hardware_from_args(a, a.plan_hardware, world, shm_link=shm)
    if link:
        hw = dataclasses.replace(hw, link_bw=link[0], link_latency=link[1])
    pre, dec, ests = planner.auto_layouts(a.model, world, wl, hw, max_num_seqs=a.max_num_seqs,
                                          tp_overlap=a.tp_overlap and not shm)
    if pre != dec and pre.tp * pre.pp > local:  # a pair needs each replica on one node
        ests = [e for e in ests if e.fits and e.prefill == e.decode]
        pre, dec = ests[0].prefill, ests[0].decode
    best = ests[0]
    nxt = ", ".join(f"{e.label} {e.tokens_per_s / best.tokens_per_s:.2f}x" for e in ests[1:3] if e.fits)
    measured = f", link measured {link[0] * 8 / 1e6:.0f} Mbit/s, {link[1] * 1e6:.0f} us per hop" if link else ""
    print(f"layouts auto: {best.label} on {world} x {hw.name} for {wl.n} requests (mean input "
          f"{wl.mean_in:.0f}, output {wl.mean_out:.0f}{measured}); next: {nxt}", file=sys.stderr)
    return f"{pre}->{dec}"
