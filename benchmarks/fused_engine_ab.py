"""The whole engine with and without the fused CPU ops (SEESAW_FUSED_OPS=0 turns off only them;
`--kernels torch` would also drop the oneDNN linears): offline greedy generation over the random
workload, fp32, runs interleaved A B A B... in one process, output tokens/s per run, and the
fused/torch ratio of each adjacent pair (robust to a host loaded by others).

    python benchmarks/fused_engine_ab.py .cache/models/random-llama-30m --requests 100 --repeats 3
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

from seesaw_mc import LLM, SamplingParams  # noqa: E402
from seesaw_mc.workloads import make_workload  # noqa: E402


def one_run(model: str, fused: bool, prompts, params, n_out: int) -> float:
    os.environ["SEESAW_FUSED_OPS"] = "1" if fused else "0"
    llm = LLM(model, dtype="float32", max_num_seqs=256)
    assert llm.engine.runner.models["prefill"].kernels.fused == fused
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the timed run computes every prompt whole
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    del llm
    return n_out / dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    vocab = json.load(open(os.path.join(a.model, "config.json")))["vocab_size"]
    reqs = make_workload("random", a.requests, vocab, seed=0, scale=1.0, input_len=0, output_len=0,
                         max_model_len=2048)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    n_out = sum(r.output_len for r in reqs)
    runs = {"fused": [], "torch": []}
    for i in range(a.repeats):
        for name in (("fused", "torch") if i % 2 == 0 else ("torch", "fused")):
            runs[name].append(one_run(a.model, name == "fused", prompts, params, n_out))
            print(f"run {i} {name}: {runs[name][-1]:.1f} output tokens/s", flush=True)
    ratios = [f / t for f, t in zip(runs["fused"], runs["torch"])]
    for name, v in runs.items():
        print(f"{name}: Throughput: {statistics.median(v):.1f} output tokens/s (median of {len(v)}, "
              f"{min(v):.1f}-{max(v):.1f})")
    print(f"fused/torch: {statistics.median(ratios):.3f}x (pairs {', '.join(f'{r:.3f}' for r in ratios)})")
    if a.json:
        json.dump({"runs": runs, "ratios": ratios, "requests": a.requests, "threads": a.threads}, open(a.json, "w"))


if __name__ == "__main__":
    main()
