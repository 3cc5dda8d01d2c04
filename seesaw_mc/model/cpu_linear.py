"""CPU linear layers through oneDNN with prepacked weights, PyTorch's own path for it: the
`mkldnn::_reorder_linear_weight` / `mkldnn::_linear_pointwise` pair that inductor's freezing
pass emits for CPU linears (and the oneDNN matmul that vLLM's CPU build calls `onednn_mm`).

The megatron-core layers stay in charge of the parallel part (their input copy, their
all-reduce or all-gather); only the local GEMM changes, through the layer's `_forward_impl`.
Weights are packed when a layout's shards are loaded at start-up and dropped when they are
released (worker/reshard.py), so a packed copy never outlives the weights it came from. A layout
loaded by a switch packs each weight on its first call that takes the packed path (`lazy`):
decode at up to SKINNY_ROWS rows never does, so a switch to such a decode packs nothing (the wide
test-bed model's TP2 shard: 0.16 s of a 0.22 s switch, and 188 MB per rank).

Why (fp32, 2 threads, AMD EPYC with AVX2, us per call, M tokens x K -> N):
    K x N        M=1            M=16           M=128           M=2048
    512x1024     81 -> 85       344 -> 215     1566 -> 1022    18915 -> 16855
    512x2816     208 -> 137     900 -> 449     3972 -> 3161    58414 -> 55715
    1408x512     98 -> 98       506 -> 381     1555 -> 1407    31274 -> 22825
    512x8192     2656 -> 484    7100 -> 2642   18710 -> 9244   230184 -> 171542
(torch.matmul -> packed oneDNN; vLLM's onednn_mm measured within 5% of the packed path.) Its
rows also do not depend on how many rows are in the batch, unlike MKL's sgemm here. (On Intel
CPUs MKL's sgemm takes over from MKL_ROWS rows, prefill sizes: there a prompt piece's last bits
may depend on the piece's length, as across the skinny bound.)
oneDNN packs bf16/fp16 only on CPUs with AVX512-BF16/FP16 or AVX-NE-CONVERT; elsewhere, and on
CUDA, layers keep megatron-core's own matmul.

Up to SKINNY_ROWS rows (decode at small batch) an fp32 layer calls the extension's `skinny_linear`
(csrc/skinny_linear.cpp) on its own unpacked weight instead: there the step is a read of every
weight, and oneDNN reads them at about half the host's read bandwidth. A chain of the 30M Llama's
33 weights (111 MB, more than L3), 2 threads, ms, oneDNN packed -> skinny_linear; two runs, the
host's read-only stream at 19-21 GB/s in the first and slower in the second:
    rows                    1           2           4           8           12          16
    run 1, oneDNN           10.8-12.6   12.4-14.1   13.9-16.9   13.3-18.3
    run 1, skinny_linear    7.2-7.8     9.6-10.3    9.0-11.4    10.1-12.8
    run 2, oneDNN           12.5-13.6                           17.7-18.1   19.2-21.1   19.7-21.1
    run 2, skinny_linear    9.7-10.0                            13.5-14.1   16.1-16.4   18.8-19.4
At 1 row that is 14-15 GB/s against oneDNN's 10, MKL's packed sgemm 8.5-8.9 and torch.mv 6.1-6.7;
at 16 rows the two are even, so 12 is the bound on AVX2 (24 with AVX-512, where a
register-tiled kernel runs: _skinny_rows). The op sums every output in one order whatever
the batch, so up to 12 rows a row's result does not depend on the others either; across the bound
(a prefill of 12 tokens recomputed as part of a longer one) the two differ in the last bits.
SEESAW_SKINNY_LINEAR=0 turns it off (A/B runs). On Intel CPUs one row alone goes to MKL's gemv
instead (_one_row_gemv), whose bits differ from the row's in a batch, as across the bound.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

log = logging.getLogger("seesaw_mc")

ONEDNN, TORCH = "onednn", "torch"


def _skinny_rows() -> int:
    """How many rows at most go to skinny_linear. Where the CPU has AVX-512 the extension's
    register-tiled kernel (csrc/skinny_linear.cpp) runs: faster than oneDNN's packed GEMM up to
    about 24 rows (the wide test-bed model's 16 TP2 weights, 376 MB, two processes at once, ms,
    tile / oneDNN: 8 rows 34-36 / 44-46, 16 rows 48-52 / 52-56, 24 rows 65.4 / 67.3, 32 rows 78-81 /
    77-80). Elsewhere its 8-wide path holds up to 12 rows (module docstring). SEESAW_SKINNY_ROWS
    overrides it (A/B runs)."""
    if os.environ.get("SEESAW_SKINNY_ROWS"):
        return int(os.environ["SEESAW_SKINNY_ROWS"])
    return 24 if torch.backends.cpu.get_cpu_capability().lower().startswith("avx512") else 12


SKINNY_ROWS = _skinny_rows()


def _one_row_gemv() -> bool:
    """One row of fp32 goes to torch's own matmul (MKL's gemv) instead of skinny_linear on Intel
    CPUs: there it read the weights 1.48x faster (the wide model's 376 MB, two processes at once,
    median of 6: 29.2 against 42.9 ms; oneDNN 39.0). On AMD, MKL's gemv was the slowest of all
    (torch.mv 6.1-6.7 GB/s against skinny_linear's 14-15, module docstring). SEESAW_ONE_ROW_GEMV=0/1
    overrides it (A/B runs)."""
    if os.environ.get("SEESAW_ONE_ROW_GEMV") in ("0", "1"):
        return os.environ["SEESAW_ONE_ROW_GEMV"] == "1"
    return _intel_mkl()


def _mkl_rows() -> int:
    """From how many rows fp32 takes torch's own matmul (MKL's sgemm on the unpacked weight)
    instead of oneDNN's packed GEMM: 1024 on Intel CPUs, where it is the faster at prefill sizes;
    0 (never) elsewhere. Intel Xeon with AVX-512, the wide test-bed model's four TP2 weights, two
    processes at once, GFLOP/s, oneDNN / MKL: 256 rows 93-99 / 95-97, 1024 rows 115-118 / 122-124,
    2048 rows 102-108 / 113-124, 4096 rows 94-110 / 111-119. MKL's packed sgemm (torch.ops.mkl.
    _mkl_linear) was faster still, but only for the one row count it was packed for. On AMD, MKL's
    sgemm was the slower (module docstring). SEESAW_MKL_ROWS overrides it (0: never; A/B runs)."""
    if os.environ.get("SEESAW_MKL_ROWS"):
        return int(os.environ["SEESAW_MKL_ROWS"])
    return 1024 if _intel_mkl() else 0


@functools.lru_cache(maxsize=1)
def _intel_mkl() -> bool:
    """An Intel CPU and a torch with MKL (read once: ONE_ROW_GEMV and MKL_ROWS both ask)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


ONE_ROW_GEMV = _one_row_gemv()
MKL_ROWS = _mkl_rows()
_CHOICE: dict = {}
_SKINNY: list = []  # [op or None, why not], probed once per process


def select_linear(requested: str, device: torch.device, dtype: torch.dtype, log_once: bool = True) -> str:
    """ONEDNN where it packs this dtype on this CPU (probed once per process), else TORCH.
    requested: the `kernels` setting; "torch" asks for plain torch everywhere."""
    key = (requested, device.type, dtype)
    if key not in _CHOICE:
        why = _unavailable(requested, device, dtype)
        _CHOICE[key] = TORCH if why else ONEDNN
        if log_once:
            if why:
                log.info("linear layers: %s (%s)", TORCH, why)
            elif dtype != torch.float32:
                log.info("linear layers: %s", ONEDNN)
            else:
                op, skinny_why = skinny_linear_op()
                log.info("linear layers: %s; up to %d rows: %s%s", ONEDNN, SKINNY_ROWS,
                         "skinny_linear" if op is not None else f"{ONEDNN} ({skinny_why})",
                         f"; from {MKL_ROWS} rows: torch (MKL)" if MKL_ROWS else "")
    return _CHOICE[key]


def skinny_linear_op():
    """(the extension's ops, "") when its `skinny_linear` is there, else (None, why not)."""
    if not _SKINNY:
        if os.environ.get("SEESAW_SKINNY_LINEAR", "1") == "0":
            _SKINNY.extend([None, "SEESAW_SKINNY_LINEAR=0"])
        else:
            from seesaw_mc.model import paged_attn_ext

            op, why = paged_attn_ext.load_op()
            if op is not None:
                try:
                    op.skinny_linear
                except (AttributeError, RuntimeError):  # an extension built before the op
                    op, why = None, "the built extension lacks it (python -m seesaw_mc.model.paged_attn_ext build)"
            _SKINNY.extend([op, why])
    return _SKINNY[0], _SKINNY[1]


def _unavailable(requested: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if requested == "torch":
        return "--kernels torch"
    if device.type != "cpu":
        return f"oneDNN packing is for CPU, not {device.type}"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN"
    try:
        w = torch.ones(8, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), pack(w), None, "none", [], "")
    except (RuntimeError, AttributeError) as e:  # e.g. bf16 "needs the cpu support avx512bw..."
        return next(iter(str(e).splitlines()), type(e).__name__)[:120]
    return None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] weight (any strides) -> oneDNN's blocked copy of it."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


class PackedLinear:
    """A layer's `_forward_impl` while its weight is packed. megatron-core calls it with the
    weight it would multiply by: the layer's own, or the embedding it is tied to. A weight that
    is not the packed one takes the plain matmul. Up to SKINNY_ROWS rows of fp32 go to
    `skinny_linear` on the weight itself (the module docstring says why), and from MKL_ROWS rows
    (Intel) to torch's matmul on it (_mkl_rows)."""

    def __init__(self, weight: torch.Tensor, lazy: bool = False):
        self.packed = None if lazy else pack(weight)
        """oneDNN's copy; with `lazy`, made by the first call that needs it."""
        self.source = (weight.data_ptr(), tuple(weight.shape))
        op, _ = skinny_linear_op() if weight.dtype == torch.float32 and weight.stride(-1) == 1 else (None, "")
        self.skinny = op.skinny_linear if op is not None else None
        self.weight = weight.detach()

    def __call__(self, input, weight, bias=None, **_megatron_kwargs):
        if (weight.data_ptr(), tuple(weight.shape)) != self.source:
            out = torch.matmul(input, weight.t())
            return out + bias if bias is not None else out
        if self.skinny is not None and input.dtype == torch.float32:
            rows = input.numel() // max(1, input.shape[-1])
            if 0 < rows <= SKINNY_ROWS:
                x = input.reshape(rows, input.shape[-1])
                out = torch.mv(self.weight, x[0])[None] if rows == 1 and ONE_ROW_GEMV else \
                    self.skinny(x.contiguous(), self.weight)
                out = out.view(*input.shape[:-1], out.shape[-1])
                return out + bias if bias is not None else out
        if MKL_ROWS and input.dtype == torch.float32 and input.numel() >= MKL_ROWS * input.shape[-1]:
            out = torch.matmul(input, self.weight.t())
            return out + bias if bias is not None else out
        if self.packed is None:
            self.packed = pack(self.weight)
        return torch.ops.mkldnn._linear_pointwise(input, self.packed, bias, "none", [], "")


def _linears(model):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def pack_model(model, lazy: bool = False) -> int:
    """Route every linear of a loaded model stage through PackedLinear, packed now or, with
    `lazy`, on first need; returns the bytes packed now."""
    total = 0
    for layer in _linears(model):
        weight = layer.weight
        if weight is None:  # an output layer tied to this stage's embedding
            weight = model.embedding.word_embeddings.weight
        layer._forward_impl = PackedLinear(weight, lazy)  # the instance attribute shadows megatron's method
        total += 0 if lazy else weight.numel() * weight.element_size()
    return total


def unpack_model(model) -> None:
    for layer in _linears(model):
        layer.__dict__.pop("_forward_impl", None)
