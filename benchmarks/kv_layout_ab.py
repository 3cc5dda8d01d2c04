"""The whole engine with head-major KV blocks (the CPU default) against token-major ones (the layout
before, and CUDA's): two engines in one process, runs interleaved A B B A ..., output tokens/s over
`generate`, median (min-max), and the greedy tokens of both compared.

Token-major is had by making `kv_head_major` answer False for the second engine; the attention op and
everything else are the same.

    python benchmarks/kv_layout_ab.py .cache/models/random-llama-30m --workloads random,sharegpt-like:0.25
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import seesaw_mc.worker.kv_tiers as kv_tiers  # noqa: E402
from seesaw_mc import LLM, SamplingParams  # noqa: E402
from seesaw_mc.workloads import make_workload  # noqa: E402


def engines(model: str) -> dict:
    real = kv_tiers.kv_head_major
    out = {}
    try:
        for name, head_major in (("head-major", True), ("token-major", False)):
            kv_tiers.kv_head_major = lambda device, head_dim, hm=head_major: hm and real(device, head_dim)
            out[name] = LLM(model, dtype="float32")
            k = out[name].engine.runner.kv_views["prefill"].layers[0][0]
            if k.shape[2] > 1:  # with one kv head per rank both layouts are the same memory
                assert (k.stride(2) == k.shape[1] * k.shape[3]) == (head_major and real(k.device, k.shape[-1]))
    finally:
        kv_tiers.kv_head_major = real
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--workloads", default="random,sharegpt-like:0.25")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llms = engines(args.model)
    vocab = llms["head-major"].engine.args.vocab_size
    results = {}
    for wl in args.workloads.split(","):
        name, _, scale = wl.partition(":")
        reqs = make_workload(name, args.requests, vocab, scale=float(scale or 1))
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
        n_out = sum(r.output_len for r in reqs)
        rates, tokens = {n: [] for n in llms}, {}
        for llm in llms.values():
            llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        for r in range(args.repeats):
            order = list(llms) if r % 2 == 0 else list(llms)[::-1]
            for n in order:
                llms[n].reset_prefix_cache()  # a repeat must not find its prompts cached
                t = time.perf_counter()
                outs = llms[n].generate(prompts, params, use_tqdm=False)
                rates[n].append(n_out / (time.perf_counter() - t))
                tokens[n] = [list(o.outputs[0].token_ids) for o in outs]
        same = sum(a == b for a, b in zip(tokens["head-major"], tokens["token-major"]))
        med = {n: statistics.median(v) for n, v in rates.items()}
        results[wl] = {"output_tokens_per_s": rates, "median": med, "identical": same, "requests": len(reqs)}
        for n, v in rates.items():
            print(f"{wl:<20} {n:<12} {med[n]:.1f} output tokens/s ({min(v):.1f}-{max(v):.1f})")
        print(f"{wl:<20} head-major / token-major {med['head-major'] / med['token-major']:.2f}x; "
              f"identical greedy tokens {same}/{len(reqs)}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "repeats": args.repeats,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
