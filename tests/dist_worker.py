"""Run under torchrun by tests/test_layouts.py: every rank builds the same engines and calls
generate(); rank 0 writes what it got to the JSON file named by argv[1]."""
import json
import os
import random
import sys
import warnings

warnings.filterwarnings("ignore")


def prompts_for(seed, n=10, vocab=320, lo=2, hi=40, shared=False):
    """Random prompts; `shared`: most of them under one 18-token system prompt, some ending inside it."""
    rng = random.Random(seed)
    out = [[rng.randrange(3, vocab - 3) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
    if shared:
        system = out[0][:18] + [5] * max(0, 18 - len(out[0]))
        out = [system[:rng.choice((10, 16))] if i % 4 == 3 else system + p[:rng.randint(1, 12)]
               for i, p in enumerate(out)]
    return out


def logprob_rows(outs):
    """Per request: its greedy tokens and, per position, {token: logprob} of the top-N."""
    return [{"tokens": o.outputs[0].token_ids,
             "top": [{str(t): lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs]}
            for o in outs]


def probe_sends(runner):
    """2 ranks, a pp2 layout among the runner's: rank 0 (leader, stage 0) sends three plans and
    two 2 MiB activations, then says so through the job's store; rank 1 waits for that word
    before it receives anything. Were a send to wait for its receive, rank 0 would never say it
    and rank 1's wait would time out. Rank 0 returns what rank 1 received."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from seesaw_mc.core.step_plan import StepPlan

    store = dist.distributed_c10d._get_default_store()
    g = next(g for g in runner.groups.values() if g.layout.pp == 2)
    shape = (2048, 256)
    if dist.get_rank() == 0:
        for i in range(3):
            runner.send_plan(StepPlan("idle", payload=i))
        for i in range(2):
            g.send_forward(torch.full(shape, float(i + 1)))
        store.set("probe/sent", "1")
        runner.flush()
        return json.loads(store.get("probe/got"))
    store.wait(["probe/sent"], timedelta(seconds=120))
    plans = [runner.receive_plan().payload for _ in range(3)]
    acts = [g.recv_forward(shape)().unique().tolist() for _ in range(2)]
    store.set("probe/got", json.dumps({"plans": plans, "activations": acts}))


def packed_linears(model):
    """[linears routed through cpu_linear.PackedLinear, those holding oneDNN's packed copy now]."""
    from seesaw_mc.model import cpu_linear

    impls = [m.__dict__.get("_forward_impl") for m in cpu_linear._linears(model)]
    impls = [i for i in impls if isinstance(i, cpu_linear.PackedLinear)]
    return [len(impls), sum(i.packed is not None for i in impls)]


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
                  pipeline_depth=case.get("depth"), tp_overlap=case.get("tp_overlap", True))
        prompts = [{"prompt_token_ids": p} for p in prompts_for(case.get("seed", 0), n=case.get("n", 10),
                                                                  vocab=case.get("vocab", 320),
                                                                  shared=case.get("shared", False))]
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
            "lockstep_groups": llm.engine.runner.lockstep_groups,
            "host_blocks": llm.engine.runner.num_host_blocks, "prefix_cache": m["prefix_cache"],
            "decode_packed": packed_linears(llm.engine.runner.models["decode"]),
        }
    if spec.get("probe_sends"):
        results["probe_sends"] = probe_sends(llm.engine.runner)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
