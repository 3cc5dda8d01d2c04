"""Paged attention kernels at the engine's shapes: one layer's call, us, min over rounds.

A/B interleaved in one process: `sdpa` (gather + SDPA, what ran before), `op` (the CPU op as the
engine calls it: prefill splits short and long prompts), `op-tm` (the same on token-major
blocks, the engine's CPU layout before head-major blocks), and for prefill `op-1call` (every
prompt through the op in one call). Head_dim 64, 8 q / 4 kv heads, block 16; the cache's blocks
are head-major as in the engine (token-major for `op-tm`) and shuffled; lengths spread
0.5x-1.5x around the middle one. One thread is timed in CPU time
(robust to a loaded host), more threads in wall time.

    python benchmarks/paged_attention.py --mode decode --threads 1,2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seesaw_mc.model import attention as A  # noqa: E402
from seesaw_mc.model import paged_attn_ext  # noqa: E402

H, HKV, D, BS, NUM_BLOCKS = 8, 4, 64, 16, 6000


def timed(fn, reps: int, rounds: int) -> float:
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = clock()
        for _ in range(reps):
            fn()
        best = min(best, (clock() - t) / reps)
    return best * 1e6


def case(mode: str, batch: int, mid: int, cache, token_major, rng):
    lens = sorted(max(1, int(mid * (0.5 + i / batch))) for i in range(batch)) if batch > 1 else [mid]
    perm, tables, at = torch.randperm(NUM_BLOCKS, generator=rng).tolist(), [], 0
    for n in lens:
        tables.append(perm[at:at + -(-n // BS)])
        at += len(tables[-1])
    if mode == "decode":
        meta = A.decode_metadata(tables, lens, BS, "cpu")
    else:
        meta = A.prefill_metadata(tables, lens, [0] * batch, BS, "cpu")
    t = len(meta.positions)
    q, k, v = torch.randn(t, H, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)

    def layer(backend, kv=cache):
        def run():
            A.set_attention_backend(backend)
            A.set_attn_metadata(meta)
            A.paged_attention(q, k, v, *kv, 0.125)
        return run

    op = paged_attn_ext.load_op()[0]

    def one_call():
        A.write_kv(*cache, k, v, meta)
        paged_attn_ext.paged_attention(op, q, *cache, *meta.paged_tensors(), 0.125)

    fns = {"sdpa": layer("sdpa"), "op": layer("op"), "op-tm": layer("op", token_major)}
    if mode == "prefill":
        fns["op-1call"] = one_call
    return lens, fns


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["decode", "prefill"], default="decode")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--contexts", default="16,100,300,600")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = torch.Generator().manual_seed(0)
    token_major = (torch.randn(NUM_BLOCKS, BS, HKV, D), torch.randn(NUM_BLOCKS, BS, HKV, D))
    cache = tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in token_major)  # head-major blocks
    names = ["sdpa", "op", "op-tm"] + (["op-1call"] if args.mode == "prefill" else [])
    print(f"| threads | batch | lengths | {' | '.join(names)} | speed-up (sdpa / op) |")
    print("|---" * (len(names) + 4) + "|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, args.batches.split(",")):
            for mid in map(int, args.contexts.split(",")):
                lens, fns = case(args.mode, batch, mid, cache, token_major, rng)
                reps = max(2, int(3000 / (batch * mid / 16 + 10)))
                us = dict.fromkeys(fns, float("inf"))
                with torch.inference_mode():
                    for _ in range(2):  # interleaved: A B A B
                        for n, f in fns.items():
                            us[n] = min(us[n], timed(f, reps, args.rounds))
                print(f"| {threads} | {batch} | {lens[0]}-{lens[-1]} | "
                      f"{' | '.join(f'{us[n]:.0f}' for n in names)} | {us['sdpa'] / us['op']:.2f}x |", flush=True)
    A.set_attention_backend(None)


if __name__ == "__main__":
    main()
