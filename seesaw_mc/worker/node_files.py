"""Files in shared memory that the ranks of one node share: the master weights and the host
KV tier. Local rank 0 creates each file, every rank maps it, and it is unlinked as soon as all
have mapped it, so that nothing is left in /dev/shm once a job is running.

They hold the weights and prompt-derived KV, so they are created owner-only (0600) and
exclusively (O_EXCL: never an existing file or a planted symlink). A job killed during
start-up (SIGKILL, the OOM killer) cannot unlink them; a full weight copy would stay in RAM.
So during start-up local rank 0 of each node keeps a marker, `seesaw-<job>.<node>.owner` (its
pid, the pid's start time, host and pid namespace; one per node, as several "nodes" can share
one host's /dev/shm), and every start-up, and our launcher after its ranks
exit, removes the `seesaw-<job>*` files of jobs whose owner is gone (sweep_stale)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
import uuid
from typing import List, Optional

from seesaw_mc.errors import CapacityError, SeesawError

PREFIX = "seesaw-"
_UNMARKED_GRACE_S = 600.0
"""Files without a readable marker (a version without markers, or a marker being written) are
left alone this long: a live job unlinks its files once its ranks have mapped them."""


def shm_dir() -> str:
    """Where the shared files go: $SEESAW_SHM_DIR (e.g. a larger tmpfs), else /dev/shm."""
    if os.environ.get("SEESAW_SHM_DIR"):
        return os.environ["SEESAW_SHM_DIR"]
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def shm_free_bytes() -> int:
    st = os.statvfs(shm_dir())
    return st.f_bavail * st.f_frsize


def require_shm(nbytes: int, what: str, smaller: str, free: Optional[int] = None) -> None:
    """Fail in one line, before writing, when `what` (nbytes) cannot fit where shared files
    go: a write past a full tmpfs fails with ENOSPC, and a sparse file's page faults past it
    kill the process with SIGBUS in the middle of a run. `smaller`: the option that asks for less."""
    d = shm_dir()
    free = shm_free_bytes() if free is None else free
    if nbytes > free:
        raise CapacityError(
            f"{d} has {free / 2**20:.0f} MiB free but {what} needs {nbytes / 2**20:.0f} MiB: give it more "
            f"(a container's /dev/shm is 64 MiB unless run with --shm-size=... or --ipc=host), {smaller}, "
            f"or set SEESAW_SHM_DIR to a directory on a larger tmpfs")


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create_exclusive(path: str, mode: str = "wb"):
    """A new file only this user can read, opened for writing; never an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise SeesawError(f"{path} already exists: another job's shared file, or a planted one; "
                          f"remove it if no job of yours is starting") from None
    return os.fdopen(fd, mode)


# -- owner markers and the sweep -------------------------------------------------------------
def _start_time(pid: int) -> Optional[str]:
    """The process's start time (clock ticks since boot): a pid reused later has another.
    None: no such process, or a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner_record(pid: Optional[int] = None) -> dict:
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": _start_time(pid), "host": socket.gethostname(), "pidns": _pid_namespace()}


def _owner_alive(owner: dict) -> bool:
    # Another container (shared /dev/shm, --ipc=host) or host: its pids mean nothing here; keep.
    if owner.get("host") != socket.gethostname() or owner.get("pidns") != _pid_namespace():
        return True
    pid = int(owner["pid"])
    if owner.get("start") is None:  # no /proc where it was written: the pid alone must do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return _start_time(pid) == owner["start"]


def claim(job: str, node: int = 0, directory: Optional[str] = None) -> str:
    """Leave this process's marker for `job`'s files on `node`; returns its path (the caller removes it)."""
    path = os.path.join(directory or shm_dir(), f"{PREFIX}{job}.{node}.owner")
    with create_exclusive(path, "w") as f:
        json.dump(owner_record(), f)
    return path


_NAME = re.compile(re.escape(PREFIX) + r"([0-9a-f]{12})(-|\.\d+\.owner$)")  # job ids: job_id()


def _stale(directory: str, job: str, names: List[str]) -> bool:
    """A job is stale when it has markers and every one names a dead owner."""
    markers = [n for n in names if n.endswith(".owner")]
    try:
        if not markers:
            raise FileNotFoundError
        owners = []
        for name in markers:
            with open(os.path.join(directory, name)) as f:
                owners.append(json.load(f))
        return not any(_owner_alive(o) for o in owners)
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        # No marker (a version without them) or one still being written: judge by age.
        newest = max(os.stat(os.path.join(directory, n)).st_mtime for n in names)
        return time.time() - newest > _UNMARKED_GRACE_S


def sweep_stale(directory: Optional[str] = None) -> List[str]:
    """Remove this user's `seesaw-*` files whose job's owner process is gone; returns their names."""
    directory = directory or shm_dir()
    jobs: dict = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        m = _NAME.match(name)
        try:
            if m and os.lstat(path).st_uid == os.getuid():
                jobs.setdefault(m.group(1), []).append(name)
        except FileNotFoundError:
            continue
    removed = []
    for job, names in jobs.items():
        try:
            if not _stale(directory, job, names):
                continue
        except FileNotFoundError:  # unlinked while we looked: its job cleaned up
            continue
        # The marker last: while it names a dead owner, a failed sweep is retried next time.
        for name in sorted(names, key=lambda n: n.endswith(".owner")):
            unlink_quietly(os.path.join(directory, name))
            removed.append(name)
    return removed


# -- collective helpers ----------------------------------------------------------------------
def job_id() -> str:
    """One id per job, the same on every rank: it names the job's shared files."""
    import torch.distributed as dist

    from seesaw_mc.parallel.megatron_adapter import control_group

    obj = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(obj, src=0, group=control_group())
    return obj[0]


@contextlib.contextmanager
def job_files():
    """The job's id, for the start-up that creates (and unlinks) its shared files. Local rank
    0 of each node first sweeps stale files, then marks the job as its own until the block
    ends: the marker lives exactly as long as files that a kill could leave behind."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    job = job_id()
    marker = None
    if mc.local_rank(dist.get_rank()) == 0:
        sweep_stale()
        marker = claim(job, mc.node_rank())
    try:
        yield job
    finally:
        if marker:
            unlink_quietly(marker)


def _node_barrier() -> None:
    import torch.distributed as dist

    from seesaw_mc.parallel.megatron_adapter import control_group

    if dist.get_world_size() > 1:
        dist.barrier(group=control_group())


def _agree_created(error: Optional[BaseException]) -> None:
    """A barrier that also carries local rank 0's failure to create a file to every rank, so
    that all of them fail with its one line (and its exit code) instead of waiting for it."""
    import torch.distributed as dist

    import seesaw_mc.errors as errors
    from seesaw_mc.parallel.megatron_adapter import control_group

    if error is None:
        mine = None
    elif isinstance(error, SeesawError):
        mine = (type(error).__name__, str(error))
    else:
        mine = ("SeesawError", f"creating a shared file failed on another rank: {error!r}")
    msgs = [mine]
    if dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, mine, group=control_group())
    if error is not None:
        raise error
    failed = next((m for m in msgs if m), None)
    if failed:
        raise getattr(errors, failed[0], SeesawError)(failed[1])


def node_shared(job: str, kind: str, create, open_):
    """Local rank 0 runs create(path), then every rank open_(path); returns what open_ gave."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    path = os.path.join(shm_dir(), f"{PREFIX}{job}-{kind}-{mc.node_rank()}")
    first = mc.local_rank(dist.get_rank()) == 0
    try:
        error = None
        if first:
            try:
                create(path)
            except Exception as e:  # noqa: BLE001 - handed to every rank, then re-raised here
                error = e
        _agree_created(error)
        obj = open_(path)
        _node_barrier()
    finally:
        if first:
            unlink_quietly(path)
            unlink_quietly(path + ".json")
    return obj
