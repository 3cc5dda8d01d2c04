"""TP all-reduce backends on one CPU host: gloo vs DeepSpeed's shared-memory all-reduce.

Run with 2 ranks; both backends run in the same processes, alternating, so their ratio is
not skewed by drift on a shared machine:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/allreduce.py \
        --model .cache/models/random-llama-57m --output benchmarks/results/allreduce

Three measurements, medians of --repeats:
  1. all-reduce latency and bandwidth (algorithm bandwidth = bytes / time), 4 KB to 16 MB fp32;
  2. the TP2 decode step time (the engine's decode time / decode steps) on a fixed workload;
  3. end-to-end throughput of a P2->T2 Seesaw run (arxiv-like workload, scaled).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from seesaw_mc.workloads import make_workload  # noqa: E402

BACKENDS = ("gloo", "deepspeed-shm")


def collective_sizes():
    size = 4 << 10
    while size <= 16 << 20:
        yield size
        size *= 4


def time_collectives(reduce_shm, repeats: int, iters: int) -> list:
    import torch
    import torch.distributed as dist

    rows = []
    for nbytes in collective_sizes():
        t = torch.ones(nbytes // 4)
        n = max(3, iters if nbytes <= (1 << 20) else iters // 10)
        med = {}
        for name in BACKENDS:
            runs = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(n):
                    if name == "gloo":
                        dist.all_reduce(t)
                    else:
                        reduce_shm(t)
                runs.append((time.perf_counter() - t0) / n)
            med[name] = statistics.median(runs)
        rows.append({"bytes": nbytes, **{f"{k}_us": v * 1e6 for k, v in med.items()},
                     **{f"{k}_GBps": nbytes / v / 1e9 for k, v in med.items()},
                     "speedup": med["gloo"] / med["deepspeed-shm"]})
    return rows


def engine_run(model: str, layouts: str, allreduce: str, reqs, max_num_seqs: int) -> dict:
    from seesaw_mc import LLM, SamplingParams
    from seesaw_mc.config import Layout

    pre, dec = Layout.parse_pair(layouts)
    llm = LLM(model, prefill_layout=pre, decode_layout=dec, allreduce=allreduce, max_num_seqs=max_num_seqs)
    assert llm.engine.runner.allreduce == allreduce, llm.engine.runner.allreduce
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()  # the timed run computes every prompt whole
    llm.engine.stats.__init__()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    st = llm.engine.stats
    n_tok = sum(len(r.prompt_token_ids) + r.output_len for r in reqs)
    res = {"elapsed_s": elapsed, "tokens_per_second": n_tok / elapsed,
           "decode_step_ms": 1e3 * st.decode_time / max(1, st.steps["decode"]), "decode_steps": st.steps["decode"],
           "tokens": [o.outputs[0].token_ids for o in outs]}
    del llm
    gc.collect()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=200, help="collectives per timing (1/10 above 1 MB)")
    p.add_argument("--decode-prompts", type=int, default=32)
    p.add_argument("--e2e-prompts", type=int, default=40)
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.txt")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from seesaw_mc.parallel import deepspeed_ops, megatron_adapter as mc

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mc.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    module, why = deepspeed_ops.load_shm_op()
    if module is None:
        print(f"DeepSpeed shm all-reduce unavailable: {why}", file=sys.stderr)
        return 1
    reduce_shm = deepspeed_ops.start_shm_allreduce(module, world, rank, dist.barrier)
    coll = time_collectives(reduce_shm, a.repeats, a.iters)

    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    decode_reqs = make_workload("fixed", a.decode_prompts, vocab, input_len=64, output_len=64)
    e2e_reqs = make_workload("arxiv-like", a.e2e_prompts, vocab, scale=0.1, seed=1)
    runs = {("tp2", b): [] for b in BACKENDS}
    runs.update({("P2->T2", b): [] for b in BACKENDS})
    for _ in range(a.repeats):
        for b in BACKENDS:  # alternate, so drift hits both alike
            runs[("tp2", b)].append(engine_run(a.model, "tp2", b, decode_reqs, 256))
            runs[("P2->T2", b)].append(engine_run(a.model, "P2->T2", b, e2e_reqs, 256))
    if rank != 0:
        return 0
    for layouts in ("tp2", "P2->T2"):  # the backends must not change a single token
        assert runs[(layouts, "gloo")][0]["tokens"] == runs[(layouts, "deepspeed-shm")][0]["tokens"], layouts
    med = {f"{lay} {b}": {k: statistics.median(r[k] for r in rs) for k in ("elapsed_s", "tokens_per_second",
                                                                              "decode_step_ms")}
           for (lay, b), rs in runs.items()}
    out = {"world_size": world, "threads_per_rank": torch.get_num_threads(), "repeats": a.repeats,
           "model": a.model, "collectives": coll, "engine": med,
           "workloads": {"tp2": f"{a.decode_prompts} x fixed 64 in / 64 out",
                         "P2->T2": f"{a.e2e_prompts} x arxiv-like x0.1"}}
    lines = [f"== all-reduce, {world} ranks on one host, fp32, median of {a.repeats}",
             f"{'bytes':>10} {'gloo us':>10} {'shm us':>10} {'gloo GB/s':>10} {'shm GB/s':>10} {'speedup':>8}"]
    for r in coll:
        lines.append(f"{r['bytes']:>10} {r['gloo_us']:>10.1f} {r['deepspeed-shm_us']:>10.1f} {r['gloo_GBps']:>10.3f} "
                     f"{r['deepspeed-shm_GBps']:>10.3f} {r['speedup']:>7.1f}x")
    lines.append(f"== engine ({out['workloads']['tp2']}; {out['workloads']['P2->T2']})")
    for lay in ("tp2", "P2->T2"):
        g, s = med[f"{lay} gloo"], med[f"{lay} deepspeed-shm"]
        lines.append(f"{lay:>7}: decode step {g['decode_step_ms']:.1f} ms (gloo) vs {s['decode_step_ms']:.1f} ms (shm), "
                     f"{g['tokens_per_second']:.0f} vs {s['tokens_per_second']:.0f} tok/s: "
                     f"{s['tokens_per_second'] / g['tokens_per_second']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if a.output:
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        with open(a.output + ".json", "w") as f:
            json.dump(out, f, indent=2)
        with open(a.output + ".txt", "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
