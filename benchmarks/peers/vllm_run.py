"""Run requests through vLLM's CPU build: the peer side of `throughput.py --backends seesaw,vllm`.

Runs with the peer venv's python (`make peers` builds it in .cache/peers/vllm), never the project's:

    .cache/peers/vllm/bin/python benchmarks/peers/vllm_run.py --requests req.json --output out.json

req.json: {"model", "prompt_token_ids": [[...]], "output_lens": [...], "tp", "pp", "executor" ("mp" or
"external_launcher"), "dtype", "max_num_seqs", "warmup", "repeats", "prefix_caching", and optionally "gate":
a folder; then rank 0 writes gate/ready after the warm-up, every rank waits for gate/go.R before repeat R,
and rank 0 writes gate/done.R after it}. out.json: {"token_ids": [[...]], "t_start", "t_ready",
"t_generated" (wall clock: the parent's spawn time makes the whole-process figure), "generate_s" (one per
repeat: the same requests generated again by the same engine), "vllm_version"}. Under external_launcher
every torchrun rank runs this script, and rank 0 writes out.json.
The VLLM_CPU_* variables are set by the caller (throughput.py); the defaults below are the comparison's.
"""
from __future__ import annotations

import argparse
import json
import os
import time

T_START = time.time()  # before vllm and torch load: their import is start-up too


def _cpu_ids(spec: str) -> list:
    """'0-1,4' -> [0, 1, 4], as vLLM parses VLLM_CPU_OMP_THREADS_BIND."""
    ids = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
    return ids


def _bind_this_rank(cfg: dict) -> None:
    """external_launcher runs one rank per process without vLLM's OMP manager, so pin this rank here to its
    part of VLLM_CPU_OMP_THREADS_BIND ("0|1"), as the mp executor pins its workers."""
    parts = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "").split("|")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg["executor"] != "external_launcher" or len(parts) <= rank or not parts[rank]:
        return
    cpus = _cpu_ids(parts[rank])
    os.sched_setaffinity(0, cpus)
    os.environ["OMP_NUM_THREADS"] = str(len(cpus))


def run(cfg: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(cfg["model"], dtype=cfg.get("dtype", "float32"), tensor_parallel_size=cfg.get("tp", 1),
              pipeline_parallel_size=cfg.get("pp", 1), distributed_executor_backend=cfg["executor"],
              max_num_seqs=cfg.get("max_num_seqs", 256), seed=0,
              # Off unless asked. On, the cache is reset before each repeat: otherwise a repeat of the
              # same requests finds its prompts cached and skips their prefill (measured: arxiv-like
              # 70 -> 238 output tokens/s from run 1 to run 2).
              enable_prefix_caching=cfg.get("prefix_caching", False))
    prompts = [{"prompt_token_ids": ids} for ids in cfg["prompt_token_ids"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in cfg["output_lens"]]
    n_warm = cfg.get("warmup", 2)
    if n_warm:
        llm.generate(prompts[:n_warm], params[:n_warm], use_tqdm=False)
    t_ready = time.time()
    gate = cfg.get("gate")
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if gate and rank0:
        _write(os.path.join(gate, "ready"), {"t_ready": t_ready})
    generate_s, token_ids = [], None
    for r in range(cfg.get("repeats", 1)):
        if gate:  # the caller runs other jobs between our repeats (benchmarks/testbed/sweep.py)
            _wait_for(os.path.join(gate, f"go.{r}"))
        if cfg.get("prefix_caching"):
            llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        generate_s.append(time.perf_counter() - t0)
        token_ids = token_ids or [list(o.outputs[0].token_ids) for o in outs]
        if gate and rank0:
            _write(os.path.join(gate, f"done.{r}"), {"generate_s": generate_s[-1], "token_ids": token_ids})
    return {"token_ids": token_ids, "t_start": T_START, "t_ready": t_ready,
            "t_generated": time.time(), "generate_s": generate_s, "vllm_version": vllm.__version__}


def _write(path: str, obj) -> None:
    """Whole or not at all: the caller polls for `path`."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _wait_for(path: str) -> None:
    while not os.path.exists(path):  # idle: no core taken from the jobs run in between
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", required=True, help="JSON file of the requests and the layout")
    p.add_argument("--output", required=True, help="JSON file for token ids and timings (rank 0)")
    a = p.parse_args()
    with open(a.requests) as f:
        cfg = json.load(f)
    for k, v in (("VLLM_CPU_KVCACHE_SPACE", "2"), ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")):
        os.environ.setdefault(k, v)
    _bind_this_rank(cfg)
    res = run(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(a.output, "w") as f:
            json.dump(res, f)
    return 0


if __name__ == "__main__":  # vLLM's mp executor spawns workers that re-import this file
    raise SystemExit(main())
