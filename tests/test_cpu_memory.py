"""Freed activation memory stays in the process on CPU (worker/cpu_memory.py): allocating a
large block again faults in no new pages. (The engine-level figure, page faults per run, is in
the throughput benchmark's JSON.)"""
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, resource, sys
    from seesaw_mc.worker.cpu_memory import keep_freed_memory
    state = keep_freed_memory("cpu") if sys.argv[1] == "on" else "off"
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 << 20  # above glibc's largest mmap threshold (32 MiB), like a large prefill's activations
    def faults_of_one_block():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.malloc(64)  # something allocated after it, as a step's other tensors are
        libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_one_block()
    print(state, max(faults_of_one_block() for _ in range(3)))
""")



def probe(mode):
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    state, faults = r.stdout.split()
    return state, int(faults)


def test_freed_memory_is_reused():
    state, faults = probe("on")
    if state == "not glibc":
        pytest.skip("malloc is not glibc's: nothing to switch")
    assert state == "on"
    assert faults < 100, faults  # 64 MiB of fresh pages would be 16384 faults
    _, plain = probe("off")
    assert plain > 10000, plain  # the default: a fresh mmap, faulted in again


def test_not_on_cuda(monkeypatch):
    from seesaw_mc.worker.cpu_memory import keep_freed_memory

    assert keep_freed_memory("cuda") == "not on CPU"
    monkeypatch.setenv("SEESAW_MALLOC_REUSE", "0")
    assert keep_freed_memory("cpu") == "SEESAW_MALLOC_REUSE=0"
