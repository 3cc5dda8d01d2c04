"""Offline throughput, modelled on vLLM's benchmark_throughput.py.

Runs the same synthetic requests through several backends in one process and prints, for
each, vLLM's line `Throughput: X requests/s, Y total tokens/s, Z output tokens/s`, then the
ratios against the first backend listed after seesaw. Every request runs with ignore_eos, so
all backends generate exactly the same number of tokens.

    python benchmarks/throughput.py --model .cache/models/SmolLM2-135M-Instruct \
        --dataset-name sharegpt-like --length-scale 0.25 --num-prompts 200 --backends seesaw,hf

The `vllm` backend is vLLM's CPU build from its own venv (`make peers`; benchmarks/peers/): under torchrun
`--layouts tp2` or `pp2` runs vLLM at the same layout with its `mp` executor from rank 0, or in every rank
with `--vllm-executor external_launcher`. Against it the script also reports output tokens/s over the whole
process (start-up included) and how many requests' greedy tokens are identical.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import warnings

T_SCRIPT = time.time()  # the whole-process figure counts from here (vLLM's: from its subprocess's spawn)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from peers import vllm_backend  # noqa: E402  (stdlib only until it runs)
from seesaw_mc.workloads import DATASETS, make_workload  # noqa: E402


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(name: str, reqs, elapsed, extra=None) -> dict:
    """elapsed: seconds of generate, or a list of them (--repeats: the same engine, the same requests
    again), reported as the median with the runs' output tokens/s alongside."""
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    n_out = sum(r.output_len for r in reqs)
    runs = list(elapsed) if isinstance(elapsed, (list, tuple)) else [elapsed]
    elapsed = statistics.median(runs)
    res = {"backend": name, "elapsed_time": elapsed, "num_requests": len(reqs), "total_num_tokens": n_in + n_out,
           "num_output_tokens": n_out, "requests_per_second": len(reqs) / elapsed,
           "tokens_per_second": (n_in + n_out) / elapsed, "output_tokens_per_second": n_out / elapsed,
           "output_tokens_per_second_runs": [n_out / t for t in runs], "peak_rss_mb": rss_mb()}
    res.update(extra or {})
    whole = ""
    if "startup_s" in res:
        res["whole_process_output_tokens_per_second"] = n_out / (res["startup_s"] + elapsed)
        whole = (f"; whole process {res['whole_process_output_tokens_per_second']:.2f} output tokens/s "
                 f"(start-up {res['startup_s']:.1f} s" +
                 (f", first step at {res['first_step_s']:.1f} s)" if "first_step_s" in res else ")"))
    if rank() != 0:
        return res
    if len(runs) > 1:
        tps = res["output_tokens_per_second_runs"]
        whole += f"; {len(runs)} runs, output tokens/s {min(tps):.2f}-{max(tps):.2f}"
    print(f"[{name}] Throughput: {res['requests_per_second']:.2f} requests/s, {res['tokens_per_second']:.2f} "
          f"total tokens/s, {res['output_tokens_per_second']:.2f} output tokens/s  ({elapsed:.1f} s){whole}",
          flush=True)
    return res


def run_seesaw(args, reqs) -> dict:
    from seesaw_mc import LLM, SamplingParams
    from seesaw_mc.config import Layout

    t_enter = time.time()
    pre, dec = Layout.parse_pair(args.layouts)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, prefill_layout=pre,
              decode_layout=dec, num_host_blocks=args.num_host_blocks, num_device_blocks=args.num_device_blocks,
              allreduce=args.allreduce, kernels=args.kernels, gpu_memory_utilization=args.gpu_memory_utilization,
              pipeline_depth=args.pipeline_depth, enable_prefix_caching=not args.no_prefix_caching)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    # Process start to the first step's token: one request, one token.
    llm.generate(prompts[:1], [SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)], use_tqdm=False)
    first_step = args.preamble_s + time.time() - t_enter
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    warm = llm.engine.metrics()
    startup = args.preamble_s + time.time() - t_enter
    elapsed = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.repeats):
        llm.reset_prefix_cache()  # a repeat must not find the last run's prompts cached
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=args.tqdm and rank() == 0)
        elapsed.append(time.perf_counter() - t0)
    # Pages faulted in per run (this rank): fresh activation memory shows here (worker/cpu_memory.py).
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.repeats
    assert [len(o.outputs[0].token_ids) for o in outs] == [r.output_len for r in reqs]
    m = llm.engine.metrics(since=warm)
    trans = m["transitions"]
    if args.timeline and rank() == 0:
        from seesaw_mc.timeline import plot_timeline

        plot_timeline(args.timeline, m["timeline"], trans,
                      title=f"{args.dataset_name} x{args.length_scale}, {args.layouts}: {len(trans)} transitions, "
                            f"{sum(t['total_s'] for t in trans) / sum(elapsed):.2%} of {sum(elapsed):.0f} s")
    return result("seesaw", reqs, elapsed, {
        "layouts": args.layouts or "tp1", "allreduce": m["allreduce"], "engine": m["engine"],
        "transitions": len(trans), "transition_time_s": sum(t["total_s"] for t in trans),
        "transition_share": sum(t["total_s"] for t in trans) / sum(elapsed), "swap": m["swap"],
        "host_blocks": m["host_blocks"], "device_blocks": m["device_blocks"], "startup_s": startup,
        "first_step_s": first_step, "page_faults_per_run": faults, "prefix_cache": m["prefix_cache"],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs]})


def _padded_generate(model, pad: int = 0):
    """generate(batch) for an HF-style model: left-padded static batch, every request to its length."""
    import torch

    def generate(batch):
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long, device=model.device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=model.device)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids):] = 1
        n = max(r.output_len for r in batch)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                           pad_token_id=pad, top_p=None, top_k=None, temperature=None)

    return generate


def _timed_batches(name, args, reqs, generate, extra) -> dict:
    generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    i = 0
    while i < len(reqs):
        batch = reqs[i:i + args.hf_max_batch_size]
        generate(batch)
        i += len(batch)
    return result(name, reqs, time.perf_counter() - t0, dict(extra, hf_max_batch_size=args.hf_max_batch_size))


def _hf_model(args):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # On the GPU our engine runs on, as the comparison needs (one rank: its local device).
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: every request gets its full length
    return model, dtype


def run_hf(args, reqs) -> dict:
    """HF generate with padded static batches, batched in arrival order like vLLM's run_hf."""
    model, _ = _hf_model(args)
    return _timed_batches("hf", args, reqs, _padded_generate(model), {})


def run_ds_autotp(args, reqs) -> dict:
    """DeepSpeed AutoTP (init_inference, tp_size = world, no kernel injection: CPU-capable)
    driving HF generate; every rank runs the same batches, rank 0 reports."""
    import deepspeed
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    model, dtype = _hf_model(args)
    world = dist.get_world_size()
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    return _timed_batches("ds-autotp", args, reqs, _padded_generate(engine.module), {"tp_size": world})


def run_mcore_static(args, reqs) -> dict:
    """megatron-core's StaticInferenceEngine (benchmarks/mcore_static.py) at --mcore-layout on
    the same ranks, from a torch_dist conversion of the same model; rank 0 reports."""
    import torch.distributed as dist

    import mcore_static
    from seesaw_mc.config import Layout
    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    world = dist.get_world_size()
    lay = Layout.parse(args.mcore_layout or f"tp{world}")
    if lay.tp * lay.pp != world:
        raise SystemExit(f"--mcore-layout {lay} needs {lay.tp * lay.pp} ranks, {world} launched")
    ckpt = mcore_static.ensure_checkpoint(
        args.model, args.mcore_checkpoint or os.path.join(os.path.dirname(HERE), ".cache", "mcore",
                                                          os.path.basename(os.path.normpath(args.model))))
    max_len = max(len(r.prompt_token_ids) + r.output_len for r in reqs)
    engine, _ = mcore_static.build(ckpt, lay.tp, lay.pp, args.hf_max_batch_size, max_len)

    def generate(batch):
        mcore_static.generate(engine, [r.prompt_token_ids for r in batch], [r.output_len for r in batch])

    return _timed_batches(f"mcore-static-{lay}", args, reqs, generate, {"layout": str(lay)})


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_vllm(args, reqs) -> dict:
    """vLLM's CPU build (its own venv, `make peers`) at --vllm-layout, default our static --layouts."""
    return vllm_backend.backend(args, reqs, result)


BACKENDS = {"seesaw": run_seesaw, "hf": run_hf, "ds-autotp": run_ds_autotp, "mcore-static": run_mcore_static,
            "vllm": run_vllm}
MULTI_RANK = {"seesaw", "ds-autotp", "mcore-static"}  # the others run on rank 0 only (vllm: see main)


def _idle_wait_group():
    """Under torchrun, a group whose barrier lets the other ranks wait, idle, while rank 0 runs a one-process
    backend: vLLM's start-up alone can outlast the engine's 600 s collective timeout on a loaded machine."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return None
    import datetime

    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=4))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset-name", default="sharegpt-like", choices=DATASETS)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=3000, help="fixed dataset")
    p.add_argument("--output-len", type=int, default=300, help="fixed dataset")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every drawn length (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="seesaw and vllm backends: generate the requests this many times after one start-up "
                        "(median reported, each run's figure kept)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--backends", default="seesaw,hf")
    p.add_argument("--layouts", default=None,
                   help="seesaw backend: a static layout (tp2) or a pair (P2->T2); run the script under torchrun")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--hf-max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--tqdm", action="store_true")
    p.add_argument("--timeline", default=None, help="seesaw backend: draw phases/transitions/tier use to this PNG")
    p.add_argument("--num-host-blocks", type=int, default=None, help="seesaw backend: host tier size (blocks)")
    p.add_argument("--allreduce", default="auto", help="seesaw backend: auto | gloo | deepspeed-shm | nccl")
    p.add_argument("--num-device-blocks", type=int, default=None, help="seesaw backend: device tier size (blocks)")
    p.add_argument("--pipeline-depth", type=int, default=None,
                   help="seesaw backend: steps in flight under pp (default: pp; 1: the pipeline drains every step)")
    p.add_argument("--no-prefix-caching", action="store_true", help="seesaw backend: no prefix sharing")
    p.add_argument("--kernels", default="auto", help="seesaw backend: auto | deepspeed | apex | torch (RMSNorm)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="seesaw backend on CUDA: share of GPU memory for weights and KV")
    p.add_argument("--mcore-layout", default=None, help="mcore-static backend: tp2, pp2... (default tp<world>)")
    p.add_argument("--mcore-checkpoint", default=None,
                   help="mcore-static backend: torch_dist folder (default: converted once into .cache/mcore/)")
    vllm_backend.add_arguments(p)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    from seesaw_mc.config import Layout
    from seesaw_mc.errors import SeesawError

    try:
        Layout.parse_pair(args.layouts)
    except SeesawError as e:  # before any backend starts: one line, not argparse's usage wall
        print(f"throughput.py: error: --layouts: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    args.preamble_s = time.time() - T_SCRIPT
    from seesaw_mc.model_spec import load_model_args

    load_model_args(args.model)  # a missing or bad model folder: ModelError's one line
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    reqs = make_workload(args.dataset_name, args.num_prompts, cfg["vocab_size"], seed=args.seed,
                         scale=args.length_scale, input_len=args.input_len, output_len=args.output_len,
                         max_model_len=cfg.get("max_position_embeddings"))
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    n_out = sum(r.output_len for r in reqs)
    if rank() == 0:
        print(f"workload {args.dataset_name} x{args.length_scale}: {len(reqs)} requests, {n_in} prompt tokens, "
              f"{n_out} output tokens; {args.threads} threads", flush=True)
    results, idle_wait = [], _idle_wait_group()
    for name in args.backends.split(","):
        if name not in BACKENDS:
            p.error(f"unknown backend {name!r} ({', '.join(BACKENDS)})")
        spmd = name in MULTI_RANK or (name == "vllm" and args.vllm_executor == "external_launcher")
        if spmd or rank() == 0:  # the others are single-process baselines (vllm's mp executor spawns its own)
            results.append(BACKENDS[name](args, reqs))
            _release_memory()  # the next backend sizes its memory from what is free
        if not spmd and idle_wait is not None:
            import torch.distributed as dist

            dist.barrier(group=idle_wait)
    if rank() != 0:
        return 0
    summarise(args, results)
    return 0


def summarise(args, results) -> None:
    tokens = {r["backend"]: r.pop("token_ids") for r in results if "token_ids" in r}
    ours = next((r for r in results if r["backend"] == "seesaw"), None)
    summary = {"model": args.model, "dataset": args.dataset_name, "length_scale": args.length_scale,
               "num_prompts": args.num_prompts, "threads": args.threads, "results": results}
    for base in (r for r in results if r["backend"] != "seesaw"):
        if ours:
            summary["ratio_vs_" + base["backend"]] = ours["tokens_per_second"] / base["tokens_per_second"]
            print(f"seesaw / {base['backend']}: {summary['ratio_vs_' + base['backend']]:.2f}x total tokens/s")
        if ours and "startup_s" in base:
            key = "ratio_whole_process_vs_" + base["backend"]
            summary[key] = (ours["whole_process_output_tokens_per_second"]
                            / base["whole_process_output_tokens_per_second"])
            print(f"seesaw / {base['backend']}: {summary[key]:.2f}x output tokens/s over the whole process")
        if "seesaw" in tokens and base["backend"] in tokens:
            same = sum(a == b for a, b in zip(tokens["seesaw"], tokens[base["backend"]]))
            summary["identical_vs_" + base["backend"]] = same
            print(f"greedy tokens identical to {base['backend']}'s: {same}/{len(tokens['seesaw'])} requests")
    if ours:  # vLLM's top-level keys describe our engine's run
        summary.update({k: ours[k] for k in ("elapsed_time", "num_requests", "total_num_tokens",
                                             "requests_per_second", "tokens_per_second")})
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    from seesaw_mc.errors import SeesawError

    try:
        raise SystemExit(main())
    except SeesawError as e:  # a bad model folder, option or request: one line, not a traceback
        print(f"throughput.py: error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
