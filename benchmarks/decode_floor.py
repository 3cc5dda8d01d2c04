"""Decode step time against the memory floor, one process (the CPU counterpart of the GPU check's
decode roofline, benchmarks/gpu/checks.py).

A decode step must read every weight it multiplies by (the embedding table is gathered, not read,
unless it is tied to the output layer) and each sequence's KV so far. The floor is those bytes over
the measured copy bandwidth (bytes read plus bytes written per second of a large `copy_`, as
probes.copy_bandwidth counts it). The step time is the median period between the starts of
consecutive decode steps in the engine's timeline, over a greedy run of 1 + N output tokens; median
of --repeats runs. The older figure, the difference of two runs of 1 and 1 + N tokens over N, is
also printed ("by difference"): at batch 64 the prefill of 64 x 128 tokens took seconds, and its
run-to-run noise over N steps moved that figure by 10-20 ms.

That floor is the issue's definition, the same as on a GPU. On a CPU two more bounds are measured, and
their larger is the roofline the step is also reported against:
- read: the same bytes over the rate of a read-only stream (a sum over a large buffer), which on a small VM
  is well below the copy figure, since a copy's bytes are half reads, half writes;
- compute: the step's multiply-adds (2 x weights x batch, plus attention over the KV) over the rate of a
  large fp32 matrix product, the most the cores give. At batch 64 in fp32 this bound is the higher one.

    python benchmarks/decode_floor.py --model .cache/models/random-llama-30m --batches 1,64 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--copy-bytes", type=int, default=256 << 20)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    import torch

    from probes import copy_bandwidth, matmul_tflops, random_prompts, read_bandwidth, timed_generate
    from seesaw_mc import LLM
    from seesaw_mc.model_spec import ModelShape, load_model_args

    torch.set_num_threads(args.threads)
    margs = load_model_args(args.model)
    shape = ModelShape.from_model_args(margs, 4)
    llm = LLM(args.model, dtype="float32", kernels=args.kernels)
    device = llm.engine.runner.device
    bw = statistics.median(copy_bandwidth(device, args.copy_bytes) for _ in range(3))
    read_bw = statistics.median(read_bandwidth(device, args.copy_bytes) for _ in range(3))
    flops_rate = statistics.median(matmul_tflops(device, torch.float32, 1024) for _ in range(3)) * 1e12
    table = margs.vocab_size * margs.hidden_size * 4
    weights = shape.params * 4 - (0 if margs.tie_word_embeddings else table)
    timed_generate(llm, random_prompts(1, 16, 16, margs.vocab_size, seed=0), 4)  # warm-up
    L, n = args.prompt_len, args.steps
    res = {"model": args.model, "threads": args.threads, "copy_bandwidth_GBps": bw / 1e9,
           "read_bandwidth_GBps": read_bw / 1e9, "matmul_GFLOPs": flops_rate / 1e9, "weight_bytes": weights,
           "kv_bytes_per_token": shape.kv_bytes_per_token(), "prompt_len": L, "steps": n, "batches": {}}
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read-only {read_bw / 1e9:.1f} GB/s, fp32 matmul "
          f"{flops_rate / 1e9:.0f} GFLOP/s; weights read per step {weights / 1e6:.1f} MB; {args.threads} threads")
    # Multiply-adds per sequence and step: every weight but a gathered (untied) embedding, and per
    # layer QK^T and PV over the context for every query head.
    matmul_params = weights // 4
    attn_per_ctx_token = 4 * margs.num_layers * margs.num_heads * margs.head_dim
    for b in (int(x) for x in args.batches.split(",")):
        prompts = random_prompts(b, L, L, margs.vocab_size, seed=b)
        steps, by_difference = [], []
        for _ in range(args.repeats):
            t1, _ = timed_generate(llm, prompts, 1)
            tn, metrics = timed_generate(llm, prompts, 1 + n)
            by_difference.append((tn - t1) / n)
            steps.append(decode_period(metrics["timeline"], b))
        step = statistics.median(steps)
        ctx = L + n / 2
        read = weights + b * ctx * shape.kv_bytes_per_token()
        floor = read / bw
        flops = b * (2 * matmul_params + attn_per_ctx_token * ctx)
        roof = max(read / read_bw, flops / flops_rate)
        row = res["batches"][str(b)] = {"step_ms": step * 1e3, "step_ms_runs": [s * 1e3 for s in steps],
                                        "step_ms_by_difference": [s * 1e3 for s in by_difference],
                                        "floor_ms": floor * 1e3, "x_floor": step / floor,
                                        "read_floor_ms": read / read_bw * 1e3, "compute_floor_ms": flops / flops_rate * 1e3,
                                        "roofline_ms": roof * 1e3, "x_roofline": step / roof,
                                        "GBps": read / step / 1e9, "GFLOPs": flops / step / 1e9, "tokens_per_s": b / step}
        print(f"batch {b:4d}: step {row['step_ms']:.2f} ms ({min(steps) * 1e3:.2f}-{max(steps) * 1e3:.2f}), "
              f"floor {row['floor_ms']:.2f} ms, {row['x_floor']:.2f}x the floor; roofline {row['roofline_ms']:.2f} ms "
              f"(read {row['read_floor_ms']:.2f}, compute {row['compute_floor_ms']:.2f}), {row['x_roofline']:.2f}x; "
              f"{row['GBps']:.1f} GB/s read, {row['GFLOPs']:.0f} GFLOP/s, {row['tokens_per_s']:.0f} tokens/s; "
              f"by difference {statistics.median(by_difference) * 1e3:.2f} ms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def decode_period(timeline, batch: int) -> float:
    """Median seconds from the start of one decode step of `batch` sequences to the start of the very
    next step, when that is one too: the whole step (scheduling, the forward, sampling, bookkeeping),
    without the prefill."""
    ours = [t[2] == "decode" and t[3] == batch for t in timeline]
    gaps = [b[0] - a[0] for a, b, x, y in zip(timeline, timeline[1:], ours, ours[1:]) if x and y]
    if not gaps:
        raise SystemExit(f"decode_floor: no two consecutive decode steps of {batch} sequences in the timeline")
    return statistics.median(gaps)


if __name__ == "__main__":
    raise SystemExit(main())
