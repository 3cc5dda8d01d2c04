"""`seesaw-mc generate | make-demo`.

Every error a user can cause ends as one line `seesaw-mc: error: ...` on stderr and a
non-zero exit code; set SEESAW_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

from seesaw_mc.errors import CapacityError, RankFailure, SeesawError

PROG = "seesaw-mc"


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=True, help="HF model folder (config.json, *.safetensors, tokenizer)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--num-device-blocks", type=int, default=None, help="exact KV block count (overrides memory)")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--num-host-blocks", type=int, default=None, help="exact host-tier block count (Seesaw pairs)")
    g.add_argument("--emulate-device-gib", type=float, default=None,
                   help="CPU test beds: act as if each rank were a device of this many GiB (weights + KV); layouts "
                        "whose weight shard does not fit are refused, like an out-of-memory GPU")
    g.add_argument("--host-memory-bytes", type=int, default=None, help="host KV tier per node (Seesaw pairs)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--prefill-layout", default=None, help="tp2 | pp4 | tp2pp2 | dp2tp2pp1 (default tp1pp1)")
    g.add_argument("--decode-layout", default=None, help="layout for decode (default: the prefill layout)")
    g.add_argument("--layouts", default=None, help="paper notation: P4->T4, D2P4->D2T4, one static layout, or "
                   "auto (generate: the planner's best for this input and the launched ranks)")
    g.add_argument("--decode-watermark", type=float, default=0.25)
    g.add_argument("--allreduce", default="auto",
                   help="auto | gloo | deepspeed-shm | nccl: tensor-parallel all-reduce (auto: nccl on CUDA, DeepSpeed shm on one CPU host when a TP "
                        "group spans every rank, else gloo)")
    g.add_argument("--collective-timeout", type=float, default=600.0,
                   help="seconds a collective may wait for the other ranks before the job stops (a hung rank)")
    g.add_argument("--kernels", default="auto", help="auto | torch | deepspeed | apex: fused-op implementations "
                   "(DeepSpeed/apex kernels are CUDA-only; the choice is logged at start-up)")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="launch this many ranks through torch's elastic launcher (torchrun)")


def _layouts(a) -> dict:
    from seesaw_mc.config import Layout

    if a.layouts and (a.prefill_layout or a.decode_layout):
        raise SeesawError("give either --layouts or --prefill-layout/--decode-layout, not both")
    if a.layouts:
        pre, dec = Layout.parse_pair(a.layouts)
    else:
        pre = Layout.parse(a.prefill_layout or a.decode_layout or "tp1")
        dec = Layout.parse(a.decode_layout) if a.decode_layout else pre
    return {"prefill_layout": pre, "decode_layout": dec}


def _engine_kwargs(a) -> dict:
    return dict(**_layouts(a), decode_watermark=a.decode_watermark, allreduce=a.allreduce, kernels=a.kernels,
                collective_timeout_s=a.collective_timeout,
                dtype=a.dtype, seed=a.seed, max_model_len=a.max_model_len, block_size=a.block_size,
                num_device_blocks=a.num_device_blocks, kv_cache_memory_bytes=a.kv_cache_memory_bytes,
                num_host_blocks=a.num_host_blocks, host_memory_bytes=a.host_memory_bytes,
                device_capacity_bytes=int(a.emulate_device_gib * 2**30) if a.emulate_device_gib else None,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling defaults (an input line's own fields win)")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Offline LLM inference with Seesaw re-sharding.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="run a JSONL batch job")
    _add_engine_args(g)
    _add_sampling_args(g)
    g.add_argument("--input", required=True, help="JSONL: one request per line")
    g.add_argument("--output", required=True, help="JSONL: one result per request, appended as they finish")
    g.add_argument("--skip-invalid", action="store_true",
                   help="serve the valid input lines; write an error record for each invalid one (default: refuse)")
    g.add_argument("--resume", action="store_true",
                   help="keep the output's complete lines and run only the requests not in it yet")
    g.add_argument("--no-tqdm", action="store_true", help="no progress bar")
    g.add_argument("--metrics-json", default=None, help="write phase times and every layout transition here")
    g.add_argument("--timeline", default=None, help="draw phases, transitions and KV tier use to this PNG")
    g.add_argument("--plan-hardware", default="measured", help="--layouts auto: hardware the planner assumes "
                   "(measured: this machine now, or a preset such as A10)")
    _add_plan_hw_args(g)
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    d = sub.add_parser("make-demo", help="prepare the bundled SmolLM2-135M-Instruct and run the demo prompts")
    d.add_argument("--model-dir", default=".cache/models/SmolLM2-135M-Instruct")
    d.add_argument("--prompts", default=None, help="demo prompts JSONL (default: examples/demo_prompts.jsonl)")
    d.add_argument("--prepare-only", action="store_true", help="only convert the model")
    d.add_argument("--max-tokens", type=int, default=64)
    d.add_argument("--layouts", default=None, help="e.g. P3->T3 (SmolLM2's 9 heads allow tp1 or tp3)")
    d.add_argument("--nproc-per-node", type=int, default=None, help="ranks to launch (torch elastic)")
    pl = sub.add_parser("plan", help="rank every layout and Seesaw pair by predicted throughput (cost model)")
    pl.add_argument("--model", required=True, help="HF config.json, a model folder, or a preset: "
                    "LLaMA3-15B, LLaMA2-13B, CodeLLaMA-34B, LLaMA2-70B")
    pl.add_argument("--hardware", default="measured",
                    help="A10 | L4 | A100-PCIe | A100-SXM | H100-PCIe | H100-SXM | measured (this machine, now)")
    pl.add_argument("--gpus", type=int, required=True, help="devices (ranks) in the job")
    pl.add_argument("--workload", default="sharegpt-like", help="arxiv-like | sharegpt-like | a JSONL input file")
    pl.add_argument("--num-prompts", type=int, default=500, help="synthetic workloads: requests")
    pl.add_argument("--length-scale", type=float, default=1.0, help="synthetic workloads: multiply every length")
    pl.add_argument("--dtype-bytes", type=int, default=None, help="bytes per weight (default: 2 for presets, "
                    "the config's dtype otherwise)")
    _add_plan_hw_args(pl)
    pl.add_argument("--emulate-device-gib", type=float, default=None,
                    help="measured hardware: each rank's device memory in GiB (default: its share of RAM)")
    pl.add_argument("--max-num-seqs", type=int, default=256)
    pl.add_argument("--static-only", action="store_true", help="rank static layouts only")
    pl.add_argument("--top", type=int, default=10)
    pl.add_argument("--json", default=None, help="also write the whole ranking here")
    c = sub.add_parser("convert", help="Megatron checkpoint (legacy or torch_dist, any TP/PP) <-> HF folder")
    c.add_argument("--input", required=True, help="Megatron checkpoint folder, or an HF model folder")
    c.add_argument("--output", required=True, help="new folder: HF model (from Megatron) or torch_dist (from HF)")
    c.add_argument("--tokenizer", default=None, help="Megatron -> HF: copy the tokenizer files from this folder")
    c.add_argument("--tp", type=int, default=None, help="expected TP of the Megatron input (checked)")
    c.add_argument("--pp", type=int, default=None, help="expected PP of the Megatron input (checked)")
    return parser


def _add_plan_hw_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan-threads", type=int, default=None,
                   help="measured hardware: threads per rank (default OMP_NUM_THREADS or 1)")
    p.add_argument("--link-mbit", type=float, default=None,
                   help="measured hardware: link rate between ranks in Mbit/s (default: loopback gloo)")
    p.add_argument("--link-latency-us", type=float, default=None,
                   help="measured hardware: seconds per collective hop, in microseconds")


def _plan_hardware(a, spec: str, world: int, shm_link: bool = False):
    from seesaw_mc.planner import SHM_LINK, resolve_hardware

    threads = a.plan_threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    bw, lat = SHM_LINK if shm_link else (None, None)
    if a.link_mbit:
        bw = a.link_mbit * 1e6 / 8
    if a.link_latency_us is not None:
        lat = a.link_latency_us * 1e-6
    cap = a.emulate_device_gib
    return resolve_hardware(spec, world, threads=threads, link_bw=bw, link_latency=lat,
                            mem_bytes=cap * 2**30 if cap else None)


def _auto_layouts(a, specs) -> str:
    """--layouts auto: rank 0 plans for this input on the launched ranks; every rank gets its answer."""
    from seesaw_mc import planner
    from seesaw_mc.parallel import megatron_adapter as mc
    from seesaw_mc.parallel.deepspeed_ops import choose_allreduce

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return "tp1"
    mc.init_distributed(timeout_s=a.collective_timeout)
    choice, problem = None, None
    if dist_rank() == 0:
        try:
            if not specs:
                raise SeesawError("--layouts auto: no valid request to plan for")
            wl = planner.Workload(os.path.basename(a.input), tuple(
                (len(s.prompt_token_ids), s.params.max_tokens or a.max_tokens) for s in specs))
            local = mc.local_world_size(world)
            shm = choose_allreduce(a.allreduce, mc.HAS_CUDA, world, local, (world,)) == "deepspeed-shm"
            hw = _plan_hardware(a, a.plan_hardware, world, shm_link=shm)
            pre, dec, ests = planner.auto_layouts(a.model, world, wl, hw, max_num_seqs=a.max_num_seqs)
            if pre != dec and pre.tp * pre.pp > local:  # a pair needs each replica on one node
                ests = [e for e in ests if e.fits and e.prefill == e.decode]
                pre, dec = ests[0].prefill, ests[0].decode
            best = ests[0]
            nxt = ", ".join(f"{e.label} {e.tokens_per_s / best.tokens_per_s:.2f}x" for e in ests[1:3] if e.fits)
            print(f"layouts auto: {best.label} on {world} x {hw.name} for {wl.n} requests (mean input "
                  f"{wl.mean_in:.0f}, output {wl.mean_out:.0f}); next: {nxt}", file=sys.stderr)
            choice = f"{pre}->{dec}"
        except SeesawError as e:
            problem = str(e)
    choice, problem = broadcast_from_rank0((choice, problem))
    if problem:
        raise SeesawError(problem)
    return choice


def cmd_plan(a) -> int:
    from seesaw_mc import planner

    if a.gpus < 1:
        raise SeesawError("--gpus must be >= 1")
    model = planner.resolve_model(a.model, a.dtype_bytes)
    wl = planner.resolve_workload(a.workload, a.num_prompts, a.length_scale)
    hw = _plan_hardware(a, a.hardware, a.gpus)
    ests = planner.plan(model, hw, a.gpus, wl, pairs=not a.static_only, max_num_seqs=a.max_num_seqs)
    print(planner.format_plan(ests, model, hw, a.gpus, wl, top=a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model.name, "hardware": hw.__dict__, "gpus": a.gpus, "workload": wl.name,
                       "ranking": [e.as_dict() for e in ests]}, f, indent=2)
    return 0 if ests and ests[0].fits else 3


def cmd_convert(a) -> int:
    from seesaw_mc.checkpoints import convert

    t0 = time.perf_counter()
    kind = convert(a.input, a.output, a.tokenizer, a.tp, a.pp)
    print(f"wrote {'an HF model' if kind == 'hf' else 'a Megatron torch_dist checkpoint'} to {a.output} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def broadcast_from_rank0(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cmd_generate(a) -> int:
    from seesaw_mc.inputs import read_requests
    from seesaw_mc.sampling_params import SamplingParams

    defaults = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                              min_p=a.min_p, ignore_eos=a.ignore_eos)
    # Cheap checks first: a bad input file fails before the model loads (all its bad lines are
    # listed together once the prompts are checked against the model's config below).
    specs, invalid = read_requests(a.input, defaults, skip_invalid=True)
    total = len(specs) + len(invalid)
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(out_dir):
        raise SeesawError(f"output folder {out_dir!r} does not exist")

    from seesaw_mc.api import LLM, lead, run_engine
    from seesaw_mc.batch_output import AppendWriter, line_key, request_key, scan_for_resume
    from seesaw_mc.preflight import check_prompt, context_limit, load_tokenizer
    from seesaw_mc.inputs import InvalidLine, error_record, output_record, raise_invalid
    from seesaw_mc.model_spec import load_model_args

    # Tokenize and check every prompt against the model's config before loading its weights,
    # so that the whole input is refused (or its bad lines set aside) up front.
    t0 = time.perf_counter()
    args = load_model_args(a.model)
    context = context_limit(args, a.max_model_len)
    tok = load_tokenizer(a.model)
    ok = []
    for spec in specs:
        try:
            if spec.messages is not None:
                ids = _chat_ids(tok, spec.messages)
            elif spec.prompt is not None:
                ids = tok.encode(spec.prompt)
            else:
                ids = spec.prompt_token_ids
            spec.prompt_token_ids = check_prompt(spec.request_id, ids, args.vocab_size, context)
            ok.append(spec)
        except SeesawError as e:  # messages are about the request; InvalidLine adds the line
            invalid.append(InvalidLine(spec.line, str(e), spec.request_id, spec.openai is not None))
    if invalid and not a.skip_invalid:
        raise_invalid(sorted(invalid, key=lambda b: b.line), total)
    if (a.layouts or "").strip().lower() == "auto":
        if a.prefill_layout or a.decode_layout:
            raise SeesawError("give either --layouts or --prefill-layout/--decode-layout, not both")
        a.layouts = _auto_layouts(a, ok)
    llm = LLM(a.model, **_engine_kwargs(a))
    eng = llm.engine
    by_id = {}
    unserved = [(b, "invalid_request") for b in invalid]  # -> an error record each
    for spec in ok:
        try:
            eng.validate_prompt(spec.request_id, spec.prompt_token_ids)
        except CapacityError as e:  # valid, but the KV tiers can never hold it: that request only fails
            unserved.append((InvalidLine(spec.line, str(e), spec.request_id, spec.openai is not None), "capacity"))
            continue
        by_id[spec.request_id] = spec
    specs = [s for s in ok if s.request_id in by_id]
    # Resume: rank 0 reads what the output already holds and every rank skips those requests
    # (the same list everywhere, so DP replicas split the rest alike). Without --resume the
    # output starts empty.
    done, problem = set(), None
    if dist_rank() == 0:
        try:
            done = scan_for_resume(a.output) if a.resume else set()
            AppendWriter(a.output, truncate=not a.resume).close()
        except (SeesawError, OSError) as e:
            problem = str(e) if isinstance(e, SeesawError) else f"cannot write {a.output}: {e.strerror}"
    done, problem = broadcast_from_rank0((done, problem))
    if problem:  # every rank stops with the same line
        raise SeesawError(problem)
    todo = [s for s in specs if request_key(s.request_id) not in done]
    if dist_rank() == 0:
        if a.resume:
            n_done = len(specs) - len(todo) + sum(line_key(b.line) in done for b, _ in unserved)
            print(f"resume: {n_done} of {total} requests already in {a.output}", file=sys.stderr)
        errors = AppendWriter(a.output, truncate=False)
        try:  # one line per input line: the requests not served get an error record
            for bad, code in sorted(unserved, key=lambda x: x[0].line):
                if line_key(bad.line) not in done:
                    errors.write(error_record(bad, code))
        finally:
            errors.close()
        if unserved:
            print(f"{len(unserved)} request(s) not served (error records in {a.output}): "
                  f"{unserved[0][1]}: line {unserved[0][0].line}: {unserved[0][0].message}", file=sys.stderr)
    if not eng.is_leader:
        eng.worker_loop()
        return 0
    mine = todo[eng.dp_rank::eng.dp_size]  # DP replicas split the requests round-robin
    for spec in mine:
        eng.add_request(spec.request_id, spec.prompt_token_ids, spec.params, prompt=spec.prompt)
    model_name = os.path.basename(os.path.normpath(a.model))
    t_load = time.perf_counter() - t0
    counts = {"requests": 0, "prompt": 0, "completion": 0}
    t1 = time.perf_counter()
    out = AppendWriter(a.output, truncate=False)
    try:
        def write(res):
            out.write(output_record(by_id[res.request_id], res, model_name))
            counts["requests"] += 1
            counts["prompt"] += res.usage["prompt_tokens"]
            counts["completion"] += res.usage["completion_tokens"]

        lead(eng, lambda: run_engine(eng, len(mine), use_tqdm=not a.no_tqdm and sys.stderr.isatty(),
                                     on_output=write))
    finally:
        out.close()
    if eng.dp_size > 1:
        parts = eng.gather_across_replicas(counts)
        if eng.dp_rank != 0:
            return 0
        counts = {k: sum(c[k] for c in parts) for k in counts}
    if a.timeline:
        from seesaw_mc.timeline import plot_timeline

        plot_timeline(a.timeline, eng.stats.timeline, eng.transitions, title=f"{eng.config.prefill_layout} -> "
                      f"{eng.config.decode_layout}: {len(eng.transitions)} transitions")
    if a.metrics_json:
        with open(a.metrics_json, "w") as f:
            swap = eng.runner.kv.summary()
            json.dump({"engine": eng.stats.as_dict(), "transitions": eng.transitions, "swap": swap,
                       "timeline": list(eng.stats.timeline)}, f, indent=2)
    el = time.perf_counter() - t1
    print(f"Throughput: {counts['requests'] / el:.2f} requests/s, {(counts['prompt'] + counts['completion']) / el:.2f} "
          f"total tokens/s, {counts['completion'] / el:.2f} output tokens/s "
          f"({counts['requests']} requests in {el:.1f} s; model load {t_load:.1f} s)", file=sys.stderr)
    return 0


def _chat_ids(tok, messages):
    if not getattr(tok, "chat_template", None):
        raise SeesawError("'messages' given but the tokenizer has no chat template")
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def cmd_make_demo(a) -> int:
    from seesaw_mc import demo

    demo.prepare_model(a.model_dir)
    if a.prepare_only:
        return 0
    from seesaw_mc.config import Layout

    pre, dec = Layout.parse_pair(a.layouts)
    demo.run_demo(a.model_dir, a.prompts, max_tokens=a.max_tokens, prefill_layout=pre, decode_layout=dec)
    return 0


def _close_distributed() -> None:
    """Tear the process groups down in order once every rank is done. Left to interpreter exit,
    gloo's transport threads could outlive their owner: a rank that had finished its work died
    with SIGABRT ("terminate called without an active exception") now and then."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def relaunch(nproc: int, argv) -> int:
    """Start `nproc` ranks of this same command through torch's elastic launcher."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = [a for i, a in enumerate(argv) if not a.startswith("--nproc-per-node")
             and not (i > 0 and argv[i - 1] == "--nproc-per-node")]
    import tempfile

    marker = os.path.join(tempfile.gettempdir(), f"seesaw-explained-{uuid.uuid4().hex}")
    os.environ["SEESAW_EXPLAINED_FILE"] = marker
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "seesaw_mc", *child)
    except ChildFailedError as e:
        first_rank, first = e.get_first_failure()
        explained = os.path.exists(marker)
        if explained:
            os.unlink(marker)
        if first.exitcode < 0:  # killed by a signal: it could not say why
            if not explained:  # ... and no surviving rank said it either
                import signal

                try:
                    sig = signal.Signals(-first.exitcode).name
                except ValueError:
                    sig = f"signal {-first.exitcode}"
                print(f"{PROG}: error: rank {first_rank} died ({sig}); the other ranks were stopped. Lines already "
                      f"in the output are kept: rerun the same command with --resume", file=sys.stderr)
            return RankFailure.exit_code
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c and c > 0), 1)  # the ranks printed their own error lines
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    _quiet_libraries()
    debug = os.environ.get("SEESAW_DEBUG") == "1"
    if getattr(a, "nproc_per_node", None) and "LOCAL_RANK" not in os.environ:
        if a.command == "make-demo":  # convert once, before the ranks start
            from seesaw_mc import demo

            demo.prepare_model(a.model_dir)
        return relaunch(a.nproc_per_node, argv)
    try:
        rc = {"generate": cmd_generate, "make-demo": cmd_make_demo, "convert": cmd_convert,
              "plan": cmd_plan}[a.command](a)
        if rc == 0:
            _close_distributed()
        return rc
    except SeesawError as e:
        if debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last line of defence: one line, not a traceback wall
        if debug:
            raise
        from seesaw_mc.parallel.procs import explain_comm_failure, is_comm_failure

        if is_comm_failure(e):
            print(f"{PROG}: error: {explain_comm_failure(e)}", file=sys.stderr)
            marker = os.environ.get("SEESAW_EXPLAINED_FILE")
            if marker:  # tells our launcher (relaunch) that the failure was reported
                open(marker, "a").close()
            return RankFailure.exit_code
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{PROG}: internal error: {type(e).__name__}: {msg} (rerun with SEESAW_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
