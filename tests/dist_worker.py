"""Run under torchrun by tests/test_layouts.py: every rank builds the same engines and calls
generate(); rank 0 writes what it got to the JSON file named by argv[1]."""
import json
import os
import random
import sys
import warnings

warnings.filterwarnings("ignore")


def prompts_for(seed, n=10, vocab=320, lo=2, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab - 3) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def logprob_rows(outs):
    """Per request: its greedy tokens and, per position, {token: logprob} of the top-N."""
    return [{"tokens": o.outputs[0].token_ids,
             "top": [{str(t): lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs]}
            for o in outs]


def main():
    from seesaw_mc import LLM, SamplingParams

    out_path, spec = sys.argv[1], json.loads(sys.argv[2])
    from seesaw_mc.worker import device_cache

    results, read_meminfo = {}, device_cache.available_host_bytes
    for case in spec["cases"]:
        # "mem_available": each rank's MemAvailable, as the host tier's sizing reads it.
        mine = case.get("mem_available", [None] * 64)[int(os.environ.get("RANK", 0))]
        device_cache.available_host_bytes = read_meminfo if mine is None else (lambda: mine)
        llm = LLM(case["model"], prefill_layout=case["prefill"], decode_layout=case["decode"],
                  block_size=4, num_device_blocks=case.get("blocks"), num_host_blocks=case.get("host_blocks"),
                  max_num_batched_tokens=case.get("budget", 4096), allreduce=case.get("allreduce", "auto"),
                  pipeline_depth=case.get("depth"))
        prompts = [{"prompt_token_ids": p} for p in prompts_for(case.get("seed", 0), n=case.get("n", 10),
                                                                  vocab=case.get("vocab", 320))]
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=case["max_tokens"]), use_tqdm=False)
        m = llm.engine.metrics()
        sampled = llm.generate(prompts[:4], [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=40 + i)
                                             for i in range(4)], use_tqdm=False)
        if case.get("logprobs"):
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=case["max_tokens"],
                                                        logprobs=case["logprobs"]), use_tqdm=False)
            results[case["name"] + ":logprobs"] = logprob_rows(outs)
        results[case["name"]] = {
            "greedy": [o.outputs[0].token_ids for o in greedy],
            "prompts": [o.prompt_token_ids for o in greedy],
            "sampled": [o.outputs[0].token_ids for o in sampled],
            "transitions": m["transitions"] if llm.engine.is_leader else [],
            "preemptions": m["engine"]["preemptions"], "swap": m["swap"], "allreduce": m["allreduce"],
            "shm_allreduce_calls": getattr(llm.engine.runner.shm_allreduce, "calls", 0),
            "host_blocks": llm.engine.runner.num_host_blocks,
        }
    if int(os.environ.get("RANK", 0)) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
