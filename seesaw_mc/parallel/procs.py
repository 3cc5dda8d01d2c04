"""Rank processes die with their launcher.

torchrun starts every rank in a session of its own, so a launcher killed with SIGKILL (an
out-of-memory kill, a scheduler's kill) would leave its ranks running: they would hold the
machine and keep appending to the job's output behind a resumed job's back. Each rank asks
the kernel for SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Under a launcher (torchrun, deepspeed), SIGKILL this rank when its launcher dies.
    Returns whether it was set."""
    if not sys.platform.startswith("linux") or "LOCAL_RANK" not in os.environ:
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


# -- which rank failed -------------------------------------------------------------------------
_PEERS: list = []  # per global rank: (hostname, pid), gathered once at start-up
_COMM_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
                 "timed out", "Socket Timeout", "NCCL error", "ProcessGroupNCCL", "Connection refused")


def record_peers(group=None) -> None:
    """Every rank learns every rank's host and pid (one all_gather at start-up, over `group`:
    the control group), so that a survivor can say which rank died."""
    import socket

    import torch.distributed as dist

    global _PEERS
    if dist.get_world_size() == 1:
        return
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=group)
    _PEERS = peers


def is_comm_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    return (dist.is_available() and dist.is_initialized() and isinstance(exc, RuntimeError)
            and any(s in str(exc) for s in _COMM_FAILURE))


def _state(pid: int) -> str:
    """/proc state letter: R/S/D running or waiting, T stopped, Z/X or "" gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[-1].split()[0]
        return "" if st in ("Z", "X") else st
    except OSError:
        return ""


def _failed_peers() -> str:
    import socket

    here = socket.gethostname()
    out = []
    for r, (host, pid) in enumerate(_PEERS):
        if host != here or pid == os.getpid():
            continue
        st = _state(pid)
        if st == "":
            out.append(f"rank {r} (pid {pid}) died")
        elif st in ("T", "t"):
            out.append(f"rank {r} (pid {pid}) is stopped")
    return ", ".join(out)


def _kill_stopped_peers() -> None:
    import socket

    here = socket.gethostname()
    for host, pid in _PEERS:
        if host == here and pid != os.getpid() and _state(pid) in ("T", "t"):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def explain_comm_failure(exc: BaseException) -> str:
    """One line for a collective that failed because another rank died or hung."""
    import time

    # A killed rank's sockets close before the kernel marks it a zombie: on a loaded machine the
    # survivor can look while the dead rank still shows as running. Give it a moment.
    deadline = time.monotonic() + 2.0
    failed = _failed_peers()
    while not failed and _PEERS and time.monotonic() < deadline:
        time.sleep(0.05)
        failed = _failed_peers()
    if failed:
        what = failed
    elif "imed out" in str(exc) or "Timeout" in str(exc):
        what = "a collective timed out (another rank hung or died; see collective_timeout_s)"
    else:
        what = "lost contact with another rank (it died, or its node is unreachable)"
    return f"{what}; this rank stopped. Lines already in the output are kept: rerun the same command with --resume"


# -- fault injection (tests) -------------------------------------------------------------------
_FAULT_COUNTS: dict = {}


def fault_point(name: str) -> None:
    """SEESAW_FAULT="RANK:POINT:N[:hang]" SIGKILLs (or SIGSTOPs: a hung rank) rank RANK the
    N-th time it reaches POINT ("prefill", "transition"): how the tests fail a rank at a
    precise moment. SEESAW_FAULT_FIRED_FILE, if set, gets the wall-clock time it fired."""
    spec = os.environ.get("SEESAW_FAULT")
    if not spec:
        return
    rank, point, n, *how = spec.split(":")
    if point != name or int(os.environ.get("RANK", "0")) != int(rank):
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(n):
        fired = os.environ.get("SEESAW_FAULT_FIRED_FILE")
        if fired:  # the tests time the stop from here: start-up time depends on the machine's load
            import time

            with open(fired, "w") as f:
                f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGSTOP if how == ["hang"] else signal.SIGKILL)


# -- watchdog ----------------------------------------------------------------------------------
class Watchdog:
    """Stops a rank that has made no progress for `timeout_s` while a run is on: a peer that
    hangs (or dies) inside a point-to-point transfer, which gloo would wait on forever. Every
    engine step beats; between runs it is disarmed. On expiry: one line, exit code 4."""

    def __init__(self, timeout_s: float):
        import threading

        self.timeout_s = timeout_s
        self.last = None  # None: disarmed
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="seesaw-watchdog", daemon=True)
        self._thread.start()

    def arm(self) -> None:
        import time

        self.last = time.monotonic()

    beat = arm

    def disarm(self) -> None:
        self.last = None

    def _watch(self) -> None:
        import sys
        import time

        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            last = self.last
            if last is None or time.monotonic() - last < self.timeout_s:
                continue
            failed = _failed_peers()
            what = failed or "another rank hung or died"
            print(f"seesaw-mc: error: no progress for {self.timeout_s:.0f} s ({what}; collective_timeout_s); "
                  f"this rank stopped. Lines already in the output are kept: rerun the same command with --resume",
                  file=sys.stderr, flush=True)
            marker = os.environ.get("SEESAW_EXPLAINED_FILE")
            if marker:
                open(marker, "a").close()
            _kill_stopped_peers()  # a stopped rank ignores the launcher's SIGTERM: do not leave it behind
            os._exit(4)
