"""Issue 16's GPU checks, one function per check, all on one GPU (see README.md beside this).

    python benchmarks/gpu/checks.py --out OUTDIR [--dry-run] [--only a,b] [--deadline EPOCH]

Each check is `check_NAME(ctx, res) -> status`: it fills `res` with what it finds as it goes
and returns "pass"/"fail" where it asserts (tokens, max abs diff, bytes) or "report" where it
only measures. harness.py runs them under time limits and writes OUTDIR/gpu_check.json.
The dry run (--dry-run) runs the same code on CPU at tiny sizes, so that the GPU run cannot
fail on a typo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness  # noqa: E402


def check_token_exact(ctx, res) -> str:
    """Greedy tokens equal HF generate on the same device, in fp32 and bf16, for the tiny
    Llama, Mistral and Qwen2 and the ~1B Llama; where bf16 departs from fp32, the first
    position (ours and HF's, for comparison)."""
    from context import TINY

    cases = [(family, lambda f=family: ctx.tiny_model(f)) for family in TINY]
    if ctx.sizes["big"] is not None:
        cases.append(("llama-1b", ctx.big_model))
    else:
        res["llama-1b"] = {"skipped": "dry run: tiny models only"}
    ok = True
    for name, make in cases:
        entry = res[name] = {"at": "building the model"}  # where a timeout caught it
        try:
            ok &= _token_exact_one(ctx, make(), entry)
        except Exception as e:  # one model's failure must not hide the others' results
            entry["error"], ok = harness._one_line(e), False
    import torch

    # fp32 matmuls in TF32 would still be compared like with like (one process), but say so.
    res["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return "pass" if ok else "fail"


def _token_exact_one(ctx, path: str, entry: dict) -> bool:
    from probes import engine_greedy, first_divergence, random_prompts
    from seesaw_mc.model_spec import load_model_args
    from tiny_models import hf_greedy

    s = ctx.sizes
    prompts = random_prompts(s["prompts"], 2, 40, load_model_args(path).vocab_size, seed=7)
    runs = {}
    for dt in ("float32", "bfloat16"):
        entry["at"] = f"HF generate, {dt}"
        ref = hf_greedy(path, prompts, s["new_tokens"], dtype=ctx.dtype(dt), device=ctx.device)
        entry["at"] = f"our engine, {dt}"
        ours = engine_greedy(ctx.llm(path, dt), prompts, s["new_tokens"])
        if dt == "float32" or not ctx.is_big(path):
            ctx.drop_llms(path)  # the 1B in bf16 stays for the checks after this one
        runs[dt] = ours, ref
        entry[dt] = {"equal": ours == ref, "first_divergence": first_divergence(ours, ref),
                     "tokens": sum(len(r) for r in ref)}
    entry["bf16_vs_fp32_ours"] = first_divergence(runs["bfloat16"][0], runs["float32"][0])
    entry["bf16_vs_fp32_hf"] = first_divergence(runs["bfloat16"][1], runs["float32"][1])
    del entry["at"]
    # bf16 is reported, not required: two implementations round bf16 in another order (our
    # attention accumulates in fp32), so a near-tie may go either way; fp32 must be exact.
    return entry["float32"]["equal"]


def check_attention(ctx, res) -> str:
    """Our paged attention (model/attention.py's public paged_attention, whatever kernel is
    behind it) against SDPA over each sequence's contiguous K/V: max abs diff, decode and
    prefill, fp32 and bf16; decode time against one padded SDPA call."""
    from attention_case import run_case

    # bf16: outputs reach |4|, where one bf16 step is 1/32; two kernels may round differently.
    tolerance = {"float32": 1e-4, "bfloat16": 5e-2}
    ok = True
    for dt, tol in tolerance.items():
        r = res[dt] = run_case(ctx.device, ctx.dtype(dt), **ctx.sizes["attn"])
        r["tolerance"] = tol
        ok &= r["decode_max_abs_diff"] <= tol and r["prefill_max_abs_diff"] <= tol
    return "pass" if ok else "fail"


def check_host_tier(ctx, res) -> str:
    """The Stager's pinned side-stream copies: offload, wipe, prefetch and the same tokens;
    their GB/s against plain pinned copies; the weight reload from the pinned master copy
    against cudaMemcpy, and the same tokens after it."""
    import tiers

    ok = tiers.kv_round_trip(ctx, ctx.tiny_model("llama"), res.setdefault("round_trip", {}))
    ok &= tiers.kv_copy_rates(ctx, ctx.big_model(), res.setdefault("copy_rates", {}))
    ok &= tiers.weight_reload(ctx, ctx.big_model(), res.setdefault("weight_reload", {}))
    return "pass" if ok else "fail"


def check_decode_roofline(ctx, res) -> str:
    """Decode step time at each batch size on the big model in bf16, against the bytes a step
    must read (weights + KV) over the measured device copy bandwidth. Goal: within 2x of that
    floor at batch 1."""
    from probes import copy_bandwidth, random_prompts, timed_generate
    from seesaw_mc.model_spec import ModelShape, load_model_args

    s, path = ctx.sizes, ctx.big_model()
    args = load_model_args(path)
    shape = ModelShape.from_model_args(args, 2)
    llm = ctx.llm(path, "bfloat16")
    bw = copy_bandwidth(ctx.device, s["copy_bytes"])
    table = args.vocab_size * args.hidden_size * 2  # the embedding is gathered, not read (untied)
    weights = shape.params * 2 - (0 if args.tie_word_embeddings else table)
    res.update(copy_bandwidth_GBps=bw / 1e9, weight_bytes=weights, kv_bytes_per_token=shape.kv_bytes_per_token())
    timed_generate(llm, random_prompts(1, 16, 16, args.vocab_size, seed=0), 4)  # warm-up
    L, steps = s["roof_prompt"], s["roof_steps"]
    rows = res["batches"] = {}
    for b in s["roof_batches"]:
        prompts = random_prompts(b, L, L, args.vocab_size, seed=b)
        t1, _ = timed_generate(llm, prompts, 1)
        tn, m = timed_generate(llm, prompts, 1 + steps)
        step = (tn - t1) / steps  # the prefill is the same in both runs
        read = weights + b * args.hidden_size * 2 + b * (L + steps / 2) * shape.kv_bytes_per_token()
        floor = read / bw
        rows[str(b)] = {"step_ms": step * 1e3, "execute_ms": m["engine"]["decode_time_s"] / steps * 1e3,
                        "floor_ms": floor * 1e3, "x_floor": step / floor, "GBps": read / step / 1e9,
                        "tokens_per_s": b / step}
    res["goal"] = "batch 1 within 2x of the floor"
    res["goal_met"] = rows["1"]["x_floor"] <= 2.0
    return "report"


def check_prefill(ctx, res) -> str:
    """Prefill TFLOP/s (matmuls and causal attention) on the big model in bf16, against the
    measured bf16 matmul rate."""
    from probes import matmul_tflops, random_prompts, timed_generate
    from seesaw_mc.model_spec import ModelShape, load_model_args

    s, path = ctx.sizes, ctx.big_model()
    args = load_model_args(path)
    shape = ModelShape.from_model_args(args, 2)
    llm = ctx.llm(path, "bfloat16")
    rate = matmul_tflops(ctx.device, ctx.dtype("bfloat16"), s["matmul_n"])
    b, L = s["prefill_batch"], s["prefill_len"]
    prompts = random_prompts(b, L, L, args.vocab_size, seed=11)
    timed_generate(llm, prompts[:1], 1)  # warm-up
    wall, m = timed_generate(llm, prompts, 1)
    secs, tokens = m["engine"]["prefill_time_s"], m["engine"]["prefill_tokens"]
    flops = (2 * args.num_layers * shape.layer_params * tokens + 2 * args.vocab_size * args.hidden_size * b
             + 4 * args.num_layers * args.num_heads * args.head_dim * b * L * (L + 1) / 2)
    res.update(matmul_TFLOPs=rate, tokens=tokens, prefill_s=secs, wall_s=wall, tokens_per_s=tokens / secs,
               TFLOPs=flops / secs / 1e12, share_of_matmul=flops / secs / 1e12 / rate)
    return "report"


def check_throughput(ctx, res) -> str:
    """benchmarks/throughput.py on the big model: our engine against HF generate, the same
    requests (sharegpt-like, ignore_eos) on the same device."""
    import throughput

    ctx.drop_llms()  # the benchmark's engine sizes its KV from the free memory
    t, path = ctx.sizes["throughput"], ctx.big_model()
    out = os.path.join(ctx.workdir, "throughput.json")
    argv = ["--model", path, "--dtype", "bfloat16", "--dataset-name", "sharegpt-like",
            "--num-prompts", str(t["num_prompts"]), "--length-scale", str(t["scale"]), "--backends", "seesaw,hf",
            "--hf-max-batch-size", str(t["hf_batch"]), "--kernels", ctx.facts.get("kernels", "torch"),
            "--gpu-memory-utilization", "0.5", "--output-json", out]
    res["argv"] = " ".join(argv)
    throughput.main(argv)
    with open(out) as f:
        doc = json.load(f)
    keep = ("elapsed_time", "num_requests", "total_num_tokens", "num_output_tokens", "tokens_per_second",
            "output_tokens_per_second")
    for r in doc["results"]:
        res[r["backend"]] = {k: r[k] for k in keep if k in r}
    res["ratio_vs_hf"] = doc.get("ratio_vs_hf")
    return "report"


def check_kernels(ctx, res) -> str:
    """Which RMSNorm model/kernels.py picks on this device and whether DeepSpeed's (a JIT
    build) and apex's load; against torch's: max abs diff and time. Reports, never fails.
    Run in a subprocess, so that a build past the time limit dies with its compiler."""
    import signal

    import torch

    hidden = 64 if ctx.sizes["big"] is None else ctx.sizes["big"]["hidden"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path))
    if ctx.device.type == "cuda":  # build for this GPU only, on every core
        env.setdefault("TORCH_CUDA_ARCH_LIST", "%d.%d" % torch.cuda.get_device_capability(ctx.device))
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    cmd = [sys.executable, os.path.join(HERE, "probes.py"), "kernels", "--device", str(ctx.device),
           "--dtype", "bfloat16", "--hidden", str(hidden), "--tokens", "4096" if ctx.device.type == "cuda" else "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(5.0, ctx.check_deadline - time.time() - 5))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        res["error"] = "the probe did not finish in time (a DeepSpeed JIT build?)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("PROBE ")), None)
    if line is None:
        res.setdefault("error", f"the probe exited with {proc.returncode}")
        res["log_tail"] = out[-3000:]
    else:
        res.update(json.loads(line[len("PROBE "):]))
        ctx.facts["kernels"] = res["auto"]["chosen"]
    return "report"


# name, function, limit on the GPU (s), limit in the dry run (s). Correctness first: a run
# that runs out of time loses figures, not verdicts. The kernel build may be slow: last.
CHECKS = [
    ("token_exact", check_token_exact, 200, 150),
    ("attention", check_attention, 40, 30),
    ("host_tier", check_host_tier, 60, 60),
    ("decode_roofline", check_decode_roofline, 60, 60),
    ("prefill", check_prefill, 40, 30),
    ("throughput", check_throughput, 120, 90),
    ("kernels", check_kernels, 150, 60),
]

if __name__ == "__main__":
    sys.exit(harness.run(CHECKS))
