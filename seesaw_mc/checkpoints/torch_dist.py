"""torch_dist checkpoints (`dist_checkpointing.save`: `metadata.json`, `common.pt` holding
the args, `*.distcp`), read and written through megatron-core's own GPTModel at TP1/PP1:
`dist_checkpointing.load(model.sharded_state_dict())` reshards any saved TP/PP into it, and
what it saves loads under any TP/PP."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator, Optional, Tuple

import torch

from seesaw_mc.checkpoints.dcp_metadata import check_metadata, restricted_metadata_reads
from seesaw_mc.checkpoints.detect import ITER_FILE, iteration_dir
from seesaw_mc.checkpoints.megatron_args import (allowed_globals, args_namespace, check_expected, check_tensors,
                                                 first_line, load_pt, model_args_from_megatron)
from seesaw_mc.errors import ModelError
from seesaw_mc.model_spec import ModelArgs


def read_torch_dist(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None,
                    trust: bool = False):
    """-> (ModelArgs, {megatron name: full tensor}) through dist_checkpointing.load into
    megatron-core's GPTModel at TP1/PP1. Needs torch.distributed with one rank (started here
    if absent). `trust`: unpickle `.metadata` without the allow-list (dcp_metadata.py)."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    d = iteration_dir(path)
    try:
        with open(os.path.join(d, "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{d}/metadata.json: {first_line(e)}") from None
    if meta.get("sharded_backend") not in (None, "torch_dist"):
        raise ModelError(f"{d}: sharded backend {meta.get('sharded_backend')!r} is not supported (torch_dist only)")
    if not trust:  # before anything else reads the folder's pickles
        check_metadata(d)
    common = load_pt(os.path.join(d, "common.pt"))
    args, tp, pp = model_args_from_megatron(common.get("args") if isinstance(common, dict) else None, d)
    check_expected(d, tp, pp, expect_tp, expect_pp)
    mc.init_distributed()
    if dist.get_world_size() != 1:
        raise ModelError("reading a torch_dist checkpoint runs in one process (seesaw-mc convert), not under torchrun")
    mc.init_megatron_parallel(1, 1)
    model = mc.megatron_gpt_model(args)
    state = _load_state(model, d, trust)
    model.load_state_dict(state["model"], strict=False)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    check_tensors(tensors, args, d)
    return args, tensors


def _load_state(model, d: str, trust: bool) -> dict:
    """dist_checkpointing.load of the model's sharded state dict; one-line errors. Its pickles
    (common.pt through torch.load, `.metadata` through DCP) are read under our allow-lists."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from seesaw_mc.parallel import megatron_adapter as mc

    guard = contextlib.nullcontext() if trust else restricted_metadata_reads()
    try:
        with mc.cpu_device_shim(), allowed_globals(), guard:
            return dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    except (Exception, CheckpointException) as e:  # missing/corrupt .distcp, shape mismatch...
        if isinstance(e, CheckpointException) and e.failures:
            inner = next(iter(e.failures.values()))[0]
            why = f"{inner.__class__.__name__}: {first_line(inner)}" if str(inner) else inner.__class__.__name__
        else:
            why = first_line(e)
        raise ModelError(f"{d}: cannot load the distributed checkpoint: missing, truncated or mismatched "
                         f"shard files ({why})") from None


def write_torch_dist(out: str, args: ModelArgs, tensors: Iterator[Tuple[str, torch.Tensor]], iteration: int = 1):
    """Full Megatron tensors -> a torch_dist checkpoint saved by megatron-core's GPTModel at
    TP1/PP1 (dist_checkpointing can load it under any TP/PP). One process."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    if dist.get_world_size() != 1:
        raise ModelError("writing a checkpoint runs in one process (seesaw-mc convert), not under torchrun")
    mc.init_megatron_parallel(1, 1)
    model = mc.megatron_gpt_model(args)
    sd = model.state_dict()
    for name, t in tensors:
        if name not in sd:
            raise ModelError(f"tensor {name} has no place in megatron-core's GPTModel")
        sd[name].copy_(t)
    save_megatron(out, model, args, iteration)


def save_megatron(out: str, model, args, iteration: int = 1, tp: int = 1, pp: int = 1) -> str:
    """dist_checkpointing.save of a GPTModel in Megatron-LM's layout (collective over the
    model's ranks). `args`: ModelArgs, or the Megatron-LM Namespace to save as is. Returns the
    iteration folder."""
    import argparse

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from seesaw_mc.parallel import megatron_adapter as mc

    d = os.path.join(out, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    ns = args if isinstance(args, argparse.Namespace) else args_namespace(args, tp, pp)
    state = {"model": model.sharded_state_dict(), "args": ns,
             "checkpoint_version": 3.0, "iteration": iteration}
    with mc.cpu_device_shim():
        dist_checkpointing.save(state, d)
    if dist.get_rank() == 0:
        with open(os.path.join(out, ITER_FILE), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return d
