"""The CPU paged-attention op (`csrc/paged_attention.cpp`) and, in the same extension, the fused
elementwise ops (`csrc/fused_ops.cpp`, called through fused_ops.py) and the few-row linear
(`csrc/skinny_linear.cpp`, called through cpu_linear.py): build, load, call.

It is a C++ extension JIT-built with `torch.utils.cpp_extension.load` into TORCH_EXTENSIONS_DIR,
the way DeepSpeed builds its ops; `make venv` builds it once into .cache/torch_extensions:

    python -m seesaw_mc.model.paged_attn_ext build

Flags: -O3 -march=native (it is built on the machine that runs it; the extension's name carries
the CPU's vector level, so a folder shared by different hosts never hands one host another's
binary) and -fopenmp, without which `at::parallel_for` runs on one thread. A host that cannot
build it (no compiler) gets None and the reason; the caller falls back to gather + SDPA.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import zlib
from typing import Optional, Tuple

import torch

log = logging.getLogger("seesaw_mc")

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = [os.path.join(_CSRC, name) for name in ("paged_attention.cpp", "fused_ops.cpp", "skinny_linear.cpp")]
_HEADERS = [os.path.join(_CSRC, "vec_math.h")]
_PROJECT_EXTENSIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                   ".cache", "torch_extensions")
_LOCK = threading.Lock()
_LOADED: Optional[Tuple[Optional[object], str]] = None


def _name() -> str:
    level = torch.backends.cpu.get_cpu_capability().lower()  # "avx2", "avx512", "default"...
    return f"seesaw_paged_attention_{level}"


def _built() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.exists(os.path.join(_get_build_directory(_name(), False), _name() + ".so"))
    except Exception:  # a private helper of torch's: if it moves, say nothing
        return True


def _build():
    from torch.utils.cpp_extension import load

    if not _built():
        log.info("building the CPU paged-attention and fused ops (once per host, a minute or two; "
                 "`make venv` does it ahead)")
    # torch rebuilds when the sources or the flags change, not the headers: their digest is a flag.
    digest = zlib.crc32(b"".join(open(h, "rb").read() for h in _HEADERS))
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17", f"-DSEESAW_HEADERS_CRC={digest}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        load(name=_name(), sources=_SOURCES, extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
    return torch.ops.seesaw


def load_op() -> Tuple[Optional[object], str]:
    """(torch.ops.seesaw, "") or (None, why it is unavailable); built the first time, then cached
    per process."""
    global _LOADED
    with _LOCK:
        if _LOADED is None:
            if "TORCH_EXTENSIONS_DIR" not in os.environ and os.path.isdir(_PROJECT_EXTENSIONS):
                os.environ["TORCH_EXTENSIONS_DIR"] = _PROJECT_EXTENSIONS  # what `make venv` built
            try:
                _LOADED = (_build(), "")
            except Exception as e:  # no compiler, a failed build, a bad .so: RuntimeError/OSError/...
                first = next((ln for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)
                _LOADED = (None, f"it did not build ({first.strip()[:160]})")
        return _LOADED


def supports(head_dim: int) -> bool:
    """The op's vectorised kernels take head_dim in multiples of 8, up to 256."""
    return head_dim % 8 == 0 and head_dim <= 256


def paged_attention(op, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_q: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; sequence s owns query rows cu_q[s]:cu_q[s+1], the last of its
    context_lens[s] tokens, whose K/V are all in the blocks listed by block_tables[s]."""
    return op.paged_attention(q.contiguous(), k_cache, v_cache, block_tables, cu_q, context_lens, scale)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["build"]:
        print("usage: python -m seesaw_mc.model.paged_attn_ext build", file=sys.stderr)
        return 2
    op, why = load_op()
    if op is None:
        print(f"warning: the CPU paged-attention op is unavailable: {why}; attention will gather + SDPA",
              file=sys.stderr)
        return 0
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "the default torch extensions folder")
    print(f"CPU paged-attention op ready in {where}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
