"""Keep freed activation memory in the process on CPU (glibc's malloc).

glibc serves every request above its mmap threshold (32 MiB at most) with a fresh mmap and
unmaps it on free, and it returns the heap's free top to the kernel past the trim threshold. A
step's activations are such requests: a 4096-token prefill's fc1 output of a 30M Llama is 46 MB.
So every step's activations were new pages, which the kernel faults in and zeroes one 4 KiB page
at a time, inside the GEMM that first writes them. Measured on the 30M Llama, 1 process, 100
random requests, two generates (2 cores, a VM where a fault costs about 4 us): 1.2-1.4 million
faults and 6.4 s of system time; with the heap kept, 0.30 million and 2.8 s, and output tokens/s
of the second generate 327 and 319 -> 353 and 349.

vLLM's CPU build gets the same effect by preloading tcmalloc. Here glibc's own switches do it,
through mallopt: no mmap for large blocks (they come from the heap and are reused once freed),
and a trim threshold of 2 GiB. The peak RSS is unchanged (the same blocks are live at the peak);
memory freed below the peak stays with the process, as with a caching allocator.
SEESAW_MALLOC_REUSE=0 leaves malloc as it is (for A/B runs).
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_STATE: dict = {}


def keep_freed_memory(device_type: str) -> str:
    """Switch glibc to keep freed memory (once per process); returns what was done, for the log."""
    if device_type != "cpu":
        return "not on CPU"
    if os.environ.get("SEESAW_MALLOC_REUSE", "1") == "0":
        return "SEESAW_MALLOC_REUSE=0"
    if "done" not in _STATE:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018  (AttributeError: not glibc, e.g. musl)
            ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
            _STATE["done"] = "on" if ok else "mallopt refused"
        except (OSError, AttributeError):
            _STATE["done"] = "not glibc"
    return _STATE["done"]
