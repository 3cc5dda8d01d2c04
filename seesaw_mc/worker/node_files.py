"""Files in shared memory that the ranks of one node share: the master weights and the host
KV tier. Local rank 0 creates each file, every rank maps it, and it is unlinked as soon as all
have mapped it, so that nothing is left in /dev/shm, even after a crash."""
from __future__ import annotations

import os
import tempfile
import uuid

import torch.distributed as dist

from seesaw_mc.parallel import megatron_adapter as mc


def shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def job_id() -> str:
    """One id per job, the same on every rank: it names the job's shared files."""
    obj = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _node_barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def node_shared(job: str, kind: str, create, open_):
    """Local rank 0 runs create(path), then every rank open_(path); returns what open_ gave."""
    path = os.path.join(shm_dir(), f"seesaw-{job}-{kind}-{mc.node_rank()}")
    first = mc.local_rank(dist.get_rank()) == 0
    try:
        if first:
            create(path)
        _node_barrier()
        obj = open_(path)
        _node_barrier()
    finally:
        if first:
            unlink_quietly(path)
            unlink_quietly(path + ".json")
    return obj
