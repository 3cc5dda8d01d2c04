"""Prefix sharing (issue 18) on the `prefix-shared` workload: our engine with sharing against the same
engine without it, in one process, switched between runs (A B B A ...), so that both see the same
minutes of a noisy host; then vLLM's CPU build with its prefix caching on, same requests, same cores.

Each engine's prefix cache is reset before every run (a repeat must not find the last run's prompts
cached). Prints vLLM-style lines, the hit rate of each tier and the prompt tokens not computed, and
writes JSON.

    python benchmarks/prefix_sharing.py --model .cache/models/random-llama-30m --num-prompts 1000 --length-scale 0.25
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "peers"))
sys.path.insert(0, os.path.dirname(HERE))


def say(*args) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 reports
        print(*args, flush=True)


def summary(runs) -> dict:
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs), "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset-name", default="prefix-shared",
                   help="seesaw_mc/workloads.py; another one measures what sharing costs where nothing is shared")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every drawn length (CPU runs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default=None, help="ours: one static layout or PREFILL->DECODE (default tp1)")
    p.add_argument("--no-vllm", action="store_true", help="skip vLLM")
    p.add_argument("--output-json", default=None)
    a = p.parse_args(argv)

    from seesaw_mc import LLM, SamplingParams
    from seesaw_mc.config import Layout
    from seesaw_mc.model_spec import load_model_args
    from seesaw_mc.workloads import make_workload

    reqs = make_workload(a.dataset_name, a.num_prompts, load_model_args(a.model).vocab_size,
                         scale=a.length_scale)
    n_out = sum(r.output_len for r in reqs)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    pre, dec = Layout.parse_pair(a.layouts)
    engines = {on: LLM(a.model, dtype="float32", prefill_layout=pre, decode_layout=dec, enable_prefix_caching=on)
               for on in (True, False)}
    for llm in engines.values():
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    tps = {True: [], False: []}
    tokens, counters = {}, {}
    for r in range(a.repeats):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            llm = engines[on]
            llm.reset_prefix_cache()
            before = llm.engine.metrics()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            tps[on].append(n_out / dt)
            counters[on] = llm.engine.metrics(since=before)
            tokens[on] = [list(o.outputs[0].token_ids) for o in outs]
            say(f"[seesaw, sharing {'on' if on else 'off'}] run {r + 1}: {n_out / dt:.2f} output tokens/s ({dt:.1f} s)")
    pc = counters[True]["prefix_cache"]
    rates = {t: pc[f"{t}_hit_blocks"] / max(pc[f"{t}_queried_blocks"], 1) for t in ("device", "host")}
    n_prompt = sum(len(r.prompt_token_ids) for r in reqs)
    res = {"workload": {"name": a.dataset_name, "num_prompts": len(reqs), "length_scale": a.length_scale,
                        "prompt_tokens": n_prompt, "output_tokens": n_out},
           "layouts": a.layouts or "tp1", "threads": os.environ.get("OMP_NUM_THREADS"),
           "seesaw_sharing": summary(tps[True]), "seesaw_no_sharing": summary(tps[False]),
           "prefix_cache": pc, "hit_rate": rates,
           "swap": {"sharing": counters[True]["swap"], "no_sharing": counters[False]["swap"]},
           "transitions": len(counters[True]["transitions"]), "prefill_tokens_saved_share": pc["prefill_tokens_saved"] / n_prompt,
           "identical_with_without": sum(x == y for x, y in zip(tokens[True], tokens[False]))}
    res["ratio_vs_no_sharing"] = res["seesaw_sharing"]["median"] / res["seesaw_no_sharing"]["median"]
    say(f"sharing on: {res['seesaw_sharing']['median']:.2f} output tokens/s ({min(tps[True]):.2f}-"
        f"{max(tps[True]):.2f}); off: {res['seesaw_no_sharing']['median']:.2f} ({min(tps[False]):.2f}-"
        f"{max(tps[False]):.2f}); {res['ratio_vs_no_sharing']:.2f}x")
    say(f"hit rate: device {rates['device']:.1%}, host {rates['host']:.1%}; prompt tokens not computed "
        f"{res['prefill_tokens_saved_share']:.1%}; identical with and without: "
        f"{res['identical_with_without']}/{len(reqs)}")
    if not a.no_vllm and pre == dec and pre.world_size == 1:  # vLLM's own ranks: run it from one process
        import vllm_backend

        out = vllm_backend.run(reqs, a.model, pre.tp, pre.pp, "mp", "float32", 256, None, a.repeats,
                               prefix_caching=True)
        v = [n_out / t for t in out["generate_s"]]
        res["vllm_prefix_caching"] = summary(v)
        res["vllm_version"] = out["vllm_version"]
        res["ratio_vs_vllm"] = res["seesaw_sharing"]["median"] / res["vllm_prefix_caching"]["median"]
        res["identical_with_vllm"] = sum(x == y for x, y in zip(tokens[True], out["token_ids"]))
        say(f"[vllm, prefix caching on] {res['vllm_prefix_caching']['median']:.2f} output tokens/s "
            f"({min(v):.2f}-{max(v):.2f}); ours {res['ratio_vs_vllm']:.2f}x; identical "
            f"{res['identical_with_vllm']}/{len(reqs)}")
    if a.output_json and int(os.environ.get("RANK", "0")) == 0:
        with open(a.output_json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
