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
