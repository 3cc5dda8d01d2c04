"""DeepSpeed's shared-memory all-reduce for CPU ranks on one host (`deepspeed_shm_comm`).

The op is a C++ extension that DeepSpeed JIT-builds into TORCH_EXTENSIONS_DIR the first
time it is loaded (`make venv` builds it into .cache/torch_extensions, so no run pays for
it). Facts it imposes, checked here and in `choose_allreduce`:
  - it reduces over *every* rank of the job at once (it ignores process groups), so it can
    serve a TP group only when that group is the whole world, on one host;
  - its fp32 kernel needs AVX2, its bf16/fp16 kernels AVX-512BW; without them it would fault;
  - without LOCAL_SIZE == world size in the environment it skips its set-up and crashes on
    first use;
  - its segments in /dev/shm are never unlinked by DeepSpeed; we unlink them once every
    rank has mapped them, so a crash leaves nothing behind.

    python -m seesaw_mc.parallel.deepspeed_ops build   # what `make venv` runs
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Callable, Optional, Tuple

import torch

from seesaw_mc.config import AllReduce
from seesaw_mc.errors import ConfigError

log = logging.getLogger("seesaw_mc")


def usable_cores() -> int:
    # The machine's count, not this process's affinity: launchers that bind ranks to cores
    # give each rank a different affinity, and every rank must choose alike.
    return os.cpu_count() or 1


def choose_allreduce(requested: str, on_cuda: bool, world: int, local_world: int, tp_sizes,
                     cores: Optional[int] = None) -> AllReduce:
    """The TP all-reduce backend for this job (pure given `cores`: same answer on every rank).

    auto: NCCL on CUDA; on CPU DeepSpeed's shared-memory all-reduce when a layout's TP group
    is the whole job on one host, gloo otherwise (across hosts, or TP groups smaller than the
    job, which the shm op cannot serve), and gloo too when the host has fewer cores than ranks:
    the shm op spin-waits, and spinning ranks starve the ones they wait for (3 ranks on 2
    cores: 3.4x slower than gloo, measured)."""
    requested = AllReduce.parse(requested, "--allreduce")
    if on_cuda:
        if requested in (AllReduce.GLOO, AllReduce.DEEPSPEED_SHM):
            raise ConfigError(f"--allreduce {requested} is for CPU ranks; on CUDA use nccl (or auto)")
        return AllReduce.NCCL
    if requested is AllReduce.NCCL:
        raise ConfigError("--allreduce nccl needs CUDA devices; this host has none (use auto, gloo or deepspeed-shm)")
    if requested is AllReduce.GLOO:
        return AllReduce.GLOO
    fits = world > 1 and local_world == world and any(tp == world for tp in tp_sizes)
    if requested is AllReduce.DEEPSPEED_SHM and not fits:
        raise ConfigError(
            f"--allreduce deepspeed-shm reduces over all {world} ranks at once on one host, so it needs a layout "
            f"with tp == {world} and all ranks on one node ({local_world} here); use gloo or auto")
    if requested is AllReduce.AUTO and fits and (cores if cores is not None else usable_cores()) < local_world:
        return AllReduce.GLOO
    return AllReduce.DEEPSPEED_SHM if fits else AllReduce.GLOO


@contextlib.contextmanager
def _quiet():
    """DeepSpeed and the extension builder talk on stdout/stderr and at INFO level."""
    ds_log = logging.getLogger("DeepSpeed")
    level = ds_log.level
    ds_log.setLevel(logging.ERROR)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield out, err
    finally:
        ds_log.setLevel(level)


_PROJECT_EXTENSIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   ".cache", "torch_extensions")


def load_shm_op() -> Tuple[Optional[object], str]:
    """Build (first time) or load DeepSpeed's shm all-reduce extension.
    Returns (module, "") or (None, why it is unavailable)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.path.isdir(_PROJECT_EXTENSIONS):
        os.environ["TORCH_EXTENSIONS_DIR"] = _PROJECT_EXTENSIONS  # what `make venv` built (source checkouts)
    try:
        with _quiet():
            import deepspeed.ops
            from deepspeed.accelerator import get_accelerator

            builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
            if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                return None, "DeepSpeed reports the op incompatible with this host"
            module = builder.load(verbose=False)
    except Exception as e:  # a failed C++ build raises RuntimeError/OSError/CalledProcessError...
        first = next((ln for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)
        return None, f"it did not build ({first.strip()[:160]})"
    if module.vector_kernel_level() < 1:
        return None, "this CPU lacks AVX2, which its fp32 kernel needs"
    return module, ""


def _segment_path(rank: int) -> str:
    # deepspeed/ops/csrc/cpu/comm/shm.cpp: "deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>"
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    return os.path.join("/dev/shm", name)


def start_shm_allreduce(module, world: int, rank: int, barrier: Callable[[], None]) -> Callable:
    """Collective over the world: map every rank's DeepSpeed workspace, then unlink ours.
    Returns reduce(tensor) -> bool: an in-place sum over all ranks, False (nothing done)
    for a dtype the op's kernels cannot take on this CPU."""
    os.environ["LOCAL_SIZE"] = str(world)
    module.initialize(world, rank)
    barrier()  # every rank has mapped every segment
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_segment_path(rank))
    level = module.vector_kernel_level()
    op = torch.ops.deepspeed.inference_all_reduce_

    def reduce(t: torch.Tensor) -> bool:
        if t.dtype == torch.float32 or (t.dtype in (torch.bfloat16, torch.float16) and level >= 2):
            op(t)
            reduce.calls += 1
            return True
        return False

    reduce.calls = 0
    return reduce


def start_tp_allreduce(backend: str) -> Tuple[str, Optional[Callable]]:
    """Set up the TP all-reduce chosen by choose_allreduce (collective over the world). If
    DeepSpeed's shm op cannot load on some rank, every rank falls back to gloo (one warning
    line). Returns (the backend in use, DeepSpeed's reduce or None; it counts its calls)."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    world = dist.get_world_size()
    if backend != "deepspeed-shm":
        mc.set_tp_allreduce(None, world)
        return backend, None
    module, why = load_shm_op()
    ok = torch.tensor([1 if module is not None else 0], dtype=torch.long)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=mc.control_group())  # every rank agrees before set-up
    if not ok.item():
        if dist.get_rank() == 0:
            logging.getLogger("seesaw_mc").warning(
                "DeepSpeed's shm all-reduce is unavailable (%s); TP all-reduce uses gloo",
                why or "it did not load on another rank")
        mc.set_tp_allreduce(None, world)
        return "gloo", None
    reduce = start_shm_allreduce(module, world, dist.get_rank(), dist.barrier)
    mc.set_tp_allreduce(reduce, world)
    return backend, reduce


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m seesaw_mc.parallel.deepspeed_ops build", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        print("deepspeed_ops: CUDA present, the CPU shm all-reduce is not needed", file=sys.stderr)
        return 0
    module, why = load_shm_op()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "the default torch extensions folder")
    if module is None:
        print(f"warning: DeepSpeed's shm all-reduce is unavailable: {why}; TP all-reduce will use gloo",
              file=sys.stderr)
        return 0
    print(f"DeepSpeed shm all-reduce ready in {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
