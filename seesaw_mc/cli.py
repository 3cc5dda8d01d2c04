"""`seesaw-mc generate | plan | convert | make-demo`: parse the command line, dispatch, and
turn every failure into one line. The batch job itself is batch_job.py; its engine flags are
generated from the config (engine_args.py).

Every error a user can cause ends as one line `seesaw-mc: error: ...` on stderr and a
non-zero exit code; set SEESAW_DEBUG=1 to see tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings

from seesaw_mc.auto_layouts import add_hardware_args, hardware_from_args
from seesaw_mc.engine_args import DefaultsHelpFormatter, add_engine_args, add_sampling_args
from seesaw_mc.errors import RankFailure, SeesawError

PROG = "seesaw-mc"


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Offline LLM inference with Seesaw re-sharding.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="run a JSONL batch job", formatter_class=DefaultsHelpFormatter)
    add_engine_args(g).add_argument("--nproc-per-node", type=int, default=None,
                   help="launch this many ranks through torch's elastic launcher (torchrun)")
    add_sampling_args(g)
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
    add_hardware_args(g)
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
    pl.add_argument("--workload", default="sharegpt-like",
                    help="arxiv-like | sharegpt-like | random | a JSONL input file")
    pl.add_argument("--num-prompts", type=int, default=500, help="synthetic workloads: requests")
    pl.add_argument("--length-scale", type=float, default=1.0, help="synthetic workloads: multiply every length")
    pl.add_argument("--dtype-bytes", type=int, default=None, help="bytes per weight (default: 2 for presets, "
                    "the config's dtype otherwise)")
    add_hardware_args(pl)
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
    c.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a torch_dist .metadata without the allow-list (it can run code: only for "
                        "checkpoints from a source you trust)")
    return parser


def cmd_plan(a) -> int:
    from seesaw_mc import planner

    if a.gpus < 1:
        raise SeesawError("--gpus must be >= 1")
    model = planner.resolve_model(a.model, a.dtype_bytes)
    wl = planner.resolve_workload(a.workload, a.num_prompts, a.length_scale)
    hw = hardware_from_args(a, a.hardware, a.gpus)
    ests = planner.plan(model, hw, a.gpus, wl, pairs=not a.static_only, max_num_seqs=a.max_num_seqs,
                        tp_overlap=True)  # GPUs: NCCL, TP prefill in lockstep (EngineConfig.tp_overlap)
    print(planner.format_plan(ests, model, hw, a.gpus, wl, top=a.top))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model.name, "hardware": hw.__dict__, "gpus": a.gpus, "workload": wl.name,
                       "ranking": [e.as_dict() for e in ests]}, f, indent=2)
    return 0 if ests and ests[0].fits else 3


def cmd_convert(a) -> int:
    from seesaw_mc.checkpoints import convert

    t0 = time.perf_counter()
    kind = convert(a.input, a.output, a.tokenizer, a.tp, a.pp, trust=a.trust_checkpoint)
    print(f"wrote {'an HF model' if kind == 'hf' else 'a Megatron torch_dist checkpoint'} to {a.output} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    from seesaw_mc import batch_job

    return batch_job.run(a)


def cmd_make_demo(a) -> int:
    from seesaw_mc import demo

    demo.prepare_model(a.model_dir)
    if a.prepare_only:
        return 0
    from seesaw_mc.config import Layout

    pre, dec = Layout.parse_pair(a.layouts)
    demo.run_demo(a.model_dir, a.prompts, max_tokens=a.max_tokens, prefill_layout=pre, decode_layout=dec)
    return 0


def _close_distributed(after_error: bool = False) -> None:
    """Tear the process groups down in order once every rank is done. Left to interpreter exit,
    gloo's transport threads could outlive their owner: a rank that had finished its work died
    with SIGABRT ("terminate called without an active exception") now and then, and once a
    corrupt checkpoint's one-line error did too. After an error only a world of one (convert, a
    1-rank generate) is torn down, quietly: ranks of a larger world skip it, their peers may be gone."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if after_error:
        if dist.get_world_size() == 1:
            with contextlib.suppress(Exception):  # the error being reported matters more
                dist.destroy_process_group()
        return
    if dist.get_world_size() > 1:
        from seesaw_mc.parallel.megatron_adapter import control_group

        dist.barrier(group=control_group())
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
    finally:
        # A rank killed during start-up leaves its shared files (a whole weight copy) in RAM.
        from seesaw_mc.worker.node_files import sweep_stale

        sweep_stale()
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
        _close_distributed(after_error=True)
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
        _close_distributed(after_error=True)
        return 1
