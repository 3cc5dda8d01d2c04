"""Soak: thousands of requests through Seesaw P2->T2 with tiers small enough for hundreds of
transitions; memory must stay flat and no request may be lost.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/soak.py \
        --num-prompts 5000 --output benchmarks/results/soak

Requests go in `--rounds` generate() calls. After each round every rank reports its RSS; the
first round is the warm-up, and the check is RSS after the last round vs after the warm-up
(goal: within 10%). A tiny random Llama is built on the spot with transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--layouts", default="P2->T2")
    p.add_argument("--num-device-blocks", type=int, default=48)
    p.add_argument("--num-host-blocks", type=int, default=40)
    p.add_argument("--model-dir", default=os.path.join(ROOT, ".cache", "models", "soak-llama"))
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.txt")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from seesaw_mc import LLM, SamplingParams
    from seesaw_mc.config import Layout

    rank = int(os.environ.get("RANK", 0))
    if not os.path.exists(os.path.join(a.model_dir, "config.json")):
        if rank == 0:
            from tiny_models import build_model

            build_model("llama", a.model_dir, layers=4, hidden=128, heads=4, kv_heads=2, seed=7, max_pos=1024)
        else:
            while not os.path.exists(os.path.join(a.model_dir, "model.safetensors")):
                time.sleep(0.5)
    pre, dec = Layout.parse_pair(a.layouts)
    llm = LLM(a.model_dir, prefill_layout=pre, decode_layout=dec, block_size=16,
              num_device_blocks=a.num_device_blocks, num_host_blocks=a.num_host_blocks)
    rng = random.Random(0)
    reqs = [([rng.randrange(3, 300) for _ in range(rng.randint(8, 200))], rng.randint(4, 48))
            for _ in range(a.num_prompts)]
    per_round = -(-len(reqs) // a.rounds)
    rows, t0 = [], time.perf_counter()
    served = 0
    for r in range(a.rounds):
        chunk = reqs[r * per_round:(r + 1) * per_round]
        if not chunk:
            break
        outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in chunk],
                            [SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True) for _, n in chunk],
                            use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [n for _, n in chunk], "a request was cut short"
        served += len(outs)
        rss = [None] * dist.get_world_size()
        dist.all_gather_object(rss, rss_mb())
        rows.append({"round": r, "requests": served, "elapsed_s": time.perf_counter() - t0,
                     "transitions": len(llm.engine.metrics()["transitions"]) if llm.engine.is_leader else None,
                     "rss_mb": rss})
        if rank == 0:
            print(f"round {r}: {served} requests, {rows[-1]['transitions']} transitions, "
                  f"RSS {', '.join(f'{x:.0f}' for x in rss)} MB, {rows[-1]['elapsed_s']:.0f} s", flush=True)
    if rank != 0:
        return 0
    warm, end = rows[0]["rss_mb"], rows[-1]["rss_mb"]
    growth = [e / w - 1 for w, e in zip(warm, end)]
    res = {"num_prompts": a.num_prompts, "served": served, "layouts": a.layouts,
           "device_blocks": a.num_device_blocks, "host_blocks": a.num_host_blocks,
           "transitions": rows[-1]["transitions"], "elapsed_s": rows[-1]["elapsed_s"],
           "rss_growth_after_warmup": growth, "rounds": rows}
    lines = [f"soak {a.layouts}: {served}/{a.num_prompts} requests served, {res['transitions']} transitions "
             f"in {res['elapsed_s']:.0f} s (device {a.num_device_blocks} / host {a.num_host_blocks} blocks of 16)",
             "RSS per rank after warm-up -> end (MB): " + ", ".join(
                 f"{w:.0f} -> {e:.0f} ({g:+.1%})" for w, e, g in zip(warm, end, growth))]
    print("\n".join(lines))
    if a.output:
        with open(a.output + ".json", "w") as f:
            json.dump(res, f, indent=2)
        with open(a.output + ".txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    ok = served == a.num_prompts and all(g <= 0.10 for g in growth)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
