"""What the GPU checks measure with and run on: timers, the device's copy and matmul ceilings,
host<->device copy rates, greedy runs of our engine and of HF, and the kernel probe.

Every function takes the device, so the same code runs on CUDA and, at tiny sizes, on CPU
(the dry run). `python probes.py kernels ...` is the kernel probe, run as a subprocess so
that a JIT build past its time limit can be killed with its compiler.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of one call of fn, the device drained before and after each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy: bytes read plus bytes written per second (KINDS.md's 4.3 TB/s
    on an H200 counts the same way). The decode floor divides bytes read by this."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), device, repeat=10, warmup=3)
    return 2 * nbytes / t


def read_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read per second by a sum over a filled fp32 buffer (a read-only stream)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / timed(lambda: a.sum(), device, repeat=10, warmup=3)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Dense n x n x n product rate on random data (zeros run faster: KINDS.md, 894 vs 788)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeat=10, warmup=3)
    return 2 * n ** 3 / t / 1e12


def host_copy_rates(device: torch.device, nbytes: int, kinds=("pinned", "pageable")) -> dict:
    """GB/s of plain copies between a host buffer and the device: pinned (cudaMemcpyAsync
    from page-locked memory, the DMA ceiling) and pageable (what an unpinned source gets)."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    out = {}
    for kind in kinds:
        pin = kind == "pinned" and device.type == "cuda"
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).fill_(2)
        out[f"h2d_{kind}_GBps"] = nbytes / timed(lambda: dev.copy_(host, non_blocking=pin), device) / 1e9
        out[f"d2h_{kind}_GBps"] = nbytes / timed(lambda: host.copy_(dev, non_blocking=pin), device) / 1e9
    return out


def first_divergence(ours: List[List[int]], ref: List[List[int]]) -> Optional[dict]:
    """The earliest output position where two greedy runs differ (over all requests), or None."""
    best = None
    for i, (a, b) in enumerate(zip(ours, ref)):
        j = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        if j is None and len(a) != len(b):
            j = min(len(a), len(b))
        if j is not None and (best is None or j < best["token"]):
            best = {"request": i, "token": j, "ours": a[j] if j < len(a) else None,
                    "ref": b[j] if j < len(b) else None}
    return best


def engine_greedy(llm, prompts: List[List[int]], max_tokens: int, ignore_eos: bool = False) -> List[List[int]]:
    from seesaw_mc import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def timed_generate(llm, prompts: List[List[int]], max_tokens: int) -> tuple:
    """(wall seconds, the engine's metrics for just this call) of one greedy run with ignore_eos,
    every prompt computed whole (the prefix cache is reset: a repeat must not find its prompts cached)."""
    llm.reset_prefix_cache()
    before = llm.engine.metrics()
    t0 = time.perf_counter()
    engine_greedy(llm, prompts, max_tokens, ignore_eos=True)
    sync(llm.engine.runner.device)
    return time.perf_counter() - t0, llm.engine.metrics(since=before)


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> List[List[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def kernel_probe(device: torch.device, dtype: torch.dtype, hidden: int, tokens: int) -> dict:
    """Each RMSNorm candidate of model/kernels.py: chosen or why not, how long choosing took
    (a JIT build, the first time), and against torch's RMSNorm: max abs diff and time."""
    from seesaw_mc.model import kernels

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    norm = torch.nn.RMSNorm(hidden, eps=1e-5, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        ref = norm(x)
        out = {"torch_us": timed(lambda: norm(x), device, repeat=20) * 1e6}
        for requested in ("deepspeed", "apex", "auto"):
            t0 = time.perf_counter()
            choice = kernels.select_kernels(requested, device, dtype, hidden, 1e-5, log_once=False)
            rec = {"chosen": choice.rmsnorm, "skipped": dict(choice.skipped), "select_s": time.perf_counter() - t0}
            if choice.rmsnorm != "torch":
                y = kernels.rmsnorm(choice, norm, x)
                rec["max_abs_diff_vs_torch"] = (y.float() - ref.float()).abs().max().item()
                rec["us"] = timed(lambda: kernels.rmsnorm(choice, norm, x), device, repeat=20) * 1e6
            out[requested] = rec
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="kernel probe (run by checks.py in a subprocess)")
    p.add_argument("what", choices=["kernels"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    a = p.parse_args(argv)
    res = kernel_probe(torch.device(a.device), getattr(torch, a.dtype), a.hidden, a.tokens)
    print("PROBE " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
