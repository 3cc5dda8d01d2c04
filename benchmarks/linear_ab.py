"""Decode steps with few rows through `skinny_linear` against oneDNN's packed GEMM, one engine in one
process, the two switched between runs (A B B A ...), so that both see the same minute of a noisy host.

A step is timed as decode_floor.py times it: the median period between consecutive decode steps of
the batch in the engine's timeline. oneDNN is had by clearing every packed layer's `skinny`; the
rest of the engine is the same. One process, one layout: a layout switch would pack new layers that
the switch does not reach. The greedy tokens of both are compared (and reported, not asserted: the
two sum in other orders, so a near-tie may go either way).

    python benchmarks/linear_ab.py --model .cache/models/random-llama-30m --batches 1,4,8,12
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def packed_layers(llm) -> list:
    from seesaw_mc.model import cpu_linear

    seen, out = set(), []
    for model in llm.engine.runner.models.values():
        if model is None or id(model) in seen:
            continue
        seen.add(id(model))
        out += [m.__dict__["_forward_impl"] for m in cpu_linear._linears(model)
                if isinstance(m.__dict__.get("_forward_impl"), cpu_linear.PackedLinear)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,4,8,12")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    import torch

    from decode_floor import decode_period
    from probes import engine_greedy, random_prompts, timed_generate
    from seesaw_mc import LLM

    torch.set_num_threads(args.threads)
    llm = LLM(args.model, dtype="float32")
    layers = packed_layers(llm)
    skinny = [impl.skinny for impl in layers]
    if not layers or all(s is None for s in skinny):
        raise SystemExit("linear_ab: no layer takes skinny_linear here (see the 'linear layers' log line)")

    def use(arm: str) -> None:
        for impl, op in zip(layers, skinny):
            impl.skinny = op if arm == "skinny_linear" else None

    vocab = llm.engine.args.vocab_size
    timed_generate(llm, random_prompts(1, 16, 16, vocab, seed=0), 4)  # warm-up
    res = {"model": args.model, "threads": args.threads, "steps": args.steps, "batches": {}}
    for b in (int(x) for x in args.batches.split(",")):
        prompts = random_prompts(b, args.prompt_len, args.prompt_len, vocab, seed=b)
        ms, tokens = {"skinny_linear": [], "onednn": []}, {}
        for r in range(args.repeats):
            for arm in (list(ms) if r % 2 == 0 else list(ms)[::-1]):
                use(arm)
                _, metrics = timed_generate(llm, prompts, 1 + args.steps)
                ms[arm].append(decode_period(metrics["timeline"], b) * 1e3)
        for arm in ms:
            use(arm)
            tokens[arm] = engine_greedy(llm, prompts, 1 + args.steps, ignore_eos=True)
        use("skinny_linear")
        same = sum(a == c for a, c in zip(tokens["skinny_linear"], tokens["onednn"]))
        med = {arm: statistics.median(v) for arm, v in ms.items()}
        res["batches"][str(b)] = {"step_ms": ms, "median_ms": med, "identical": same}
        print(f"batch {b:3d}: skinny_linear {med['skinny_linear']:.2f} ms "
              f"({min(ms['skinny_linear']):.2f}-{max(ms['skinny_linear']):.2f}), oneDNN {med['onednn']:.2f} ms "
              f"({min(ms['onednn']):.2f}-{max(ms['onednn']):.2f}): {med['onednn'] / med['skinny_linear']:.2f}x; "
              f"identical greedy tokens {same}/{b}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
