"""The host-tier parts of the GPU check, on one GPU.

A prefill->decode layout pair needs two ranks, and NCCL refuses two ranks on one GPU, so the
engine never opens its host tier here. These functions drive the same objects directly:
the host tier (HostKVBuffer) and the Stager's pinned staging buffer and side stream, through
the engine's own KVTiers (offload and prefetch under copy tickets), and the re-shard's
reload of a layout's weights from the page-locked master copy.
"""
from __future__ import annotations

import math
import os

import torch

from probes import engine_greedy, host_copy_rates, random_prompts, timed
from seesaw_mc import SamplingParams
from seesaw_mc.model_spec import kv_bytes, load_model_args
from seesaw_mc.worker.device_cache import DeviceKVBuffer
from seesaw_mc.worker.host_tier import HostKVBuffer, Stager
from seesaw_mc.worker.node_files import shm_dir


def open_host_tier(args, num_blocks: int, block_size: int, dtype: torch.dtype) -> HostKVBuffer:
    """A one-replica host tier in shared memory, unlinked at once (the mapping stays)."""
    path = os.path.join(shm_dir(), f"seesaw-gpu-check-{os.getpid()}-{num_blocks}.kv")
    shape = HostKVBuffer.shape(1, args.num_layers, args.num_kv_heads, num_blocks, block_size, args.head_dim)
    host = HostKVBuffer.open(path, shape, dtype, 0, create=True)
    os.unlink(path)
    return host


def kv_round_trip(ctx, path: str, res: dict) -> bool:
    """Prefill, offload every block to the host tier, wipe the device cache, prefetch the
    blocks back, decode on: the tokens must equal a run that never left the device."""
    llm = ctx.llm(path, "float32")
    eng = llm.engine
    prompts = random_prompts(ctx.sizes["prompts"], 8, 40, eng.args.vocab_size, seed=3)
    n = ctx.sizes["new_tokens"]
    ref = engine_greedy(llm, prompts, n)
    kv = eng.runner.kv
    bs = eng.config.cache.block_size
    host_blocks = sum(math.ceil((len(p) + n) / bs) for p in prompts)
    kv.host = open_host_tier(eng.args, host_blocks, bs, eng.dtype)
    kv.stager = Stager(ctx.device, eng.dtype)  # pinned staging + side stream on CUDA
    try:
        params = SamplingParams(temperature=0.0, max_tokens=n)
        ids = [f"round-trip-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            eng.add_request(rid, p, params)
        seqs = [eng.requests[rid].seqs[0] for rid in ids]
        done = {}
        while any(s.num_output_tokens == 0 for s in seqs):  # prefill every prompt
            done.update((o.request_id, o) for o in eng.step())
        pairs = [(b, j) for j, b in enumerate(b for s in seqs for b in s.block_table)]
        kv.offload(pairs, ticket=1)
        kv.wait([1])
        kv.buffer.buf.zero_()  # the host tier now holds the only copy
        kv.prefetch(pairs, ticket=2)
        kv.wait([2])
        while eng.has_unfinished_requests():
            done.update((o.request_id, o) for o in eng.step())
        got = [list(done[rid].outputs[0].token_ids) for rid in ids]
        res.update(blocks=len(pairs), bytes_each_way=kv.host.bytes_out, tokens_equal=got == ref,
                   staged=kv.stager.cuda)
        return got == ref
    finally:
        kv.host, kv.stager = None, None
        ctx.drop_llms(path)


def kv_copy_rates(ctx, path: str, res: dict) -> bool:
    """The Stager's offload and prefetch of `tier_blocks` blocks of the model's KV (bf16),
    GB/s, against plain pinned and pageable copies of the same bytes; the round trip must
    bring back every byte."""
    args = load_model_args(path)
    dtype, bs, n = torch.bfloat16, 16, ctx.sizes["tier_blocks"]
    nbytes = n * kv_bytes(args.num_layers, bs, args.num_kv_heads, args.head_dim, dtype.itemsize)
    geometry = (args.num_layers, n, bs, args.num_kv_heads, args.head_dim, dtype)
    src_buf, dst_buf = DeviceKVBuffer(nbytes, ctx.device), DeviceKVBuffer(nbytes, ctx.device)
    src_buf.buf.view(dtype).normal_()
    src, dst = src_buf.views(*geometry), dst_buf.views(*geometry)
    host = open_host_tier(args, n, bs, dtype)
    stager = Stager(ctx.device, dtype)
    pairs = [(i, i) for i in range(n)]

    def offload():
        stager.begin()
        host.copy_out(src, 0, 0, pairs, stager)

    def prefetch():
        stager.begin()
        host.copy_in(dst, 0, 0, pairs, stager)

    t_out = timed(offload, ctx.device, repeat=3)
    t_in = timed(prefetch, ctx.device, repeat=3)
    equal = torch.equal(src_buf.buf[:nbytes], dst_buf.buf[:nbytes])
    plain = host_copy_rates(ctx.device, nbytes)
    res.update(bytes=nbytes, offload_GBps=nbytes / t_out / 1e9, prefetch_GBps=nbytes / t_in / 1e9,
               round_trip_equal=equal, plain=plain,
               offload_vs_pinned=nbytes / t_out / 1e9 / plain["d2h_pinned_GBps"],
               prefetch_vs_pinned=nbytes / t_in / 1e9 / plain["h2d_pinned_GBps"])
    return equal


def weight_reload(ctx, path: str, res: dict) -> bool:
    """A transition's weight copy: release the active layout's shards and load them again
    from the master copy (asynchronous DMA on the weight stream when the master is pinned),
    GB/s against a plain pinned host->device copy; the tokens after must equal those before."""
    from seesaw_mc.worker.reshard import release_weights

    llm = ctx.llm(path, "bfloat16")
    r = llm.engine.runner.weights
    prompts = random_prompts(2, 8, 16, llm.engine.args.vocab_size, seed=5)
    before = engine_greedy(llm, prompts, 8)
    model = r.models[r.active]
    cuda = ctx.device.type == "cuda"

    def reload():
        release_weights(model)
        if not cuda:
            return r._load(model)
        with torch.cuda.stream(r._weight_stream):
            r._load(model, non_blocking=r.master.pinned)
        r._weight_stream.synchronize()

    t = timed(reload, ctx.device, repeat=3)
    after = engine_greedy(llm, prompts, 8)
    nbytes = r.resident_bytes()  # 0 on CPU: the shards are views of the master copy
    res.update(master_pinned=r.master.pinned, bytes=nbytes, seconds=t, GBps=nbytes / t / 1e9 if nbytes else None,
               tokens_equal=before == after)
    if cuda:
        res["h2d_pinned_GBps"] = host_copy_rates(ctx.device, nbytes, kinds=("pinned",))["h2d_pinned_GBps"]
        res["vs_pinned"] = res["GBps"] / res["h2d_pinned_GBps"]
    return before == after
