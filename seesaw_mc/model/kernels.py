"""Which implementation runs each fused op, chosen once per process and logged once.

RMSNorm candidates, in order: DeepSpeed's inference kernel (`CUDARMSNorm`, FastGen core ops,
JIT-built with nvcc), apex's `fused_rms_norm_affine`, then torch (`WrappedTorchNorm`, i.e.
torch.nn.RMSNorm, what megatron-core itself uses without TE/apex). The first two are CUDA-only:
on CPU torch is chosen without importing either. A candidate that fails to import, build or
accept the shape is skipped with its reason recorded, never raised.

On CPU (unless `--kernels torch`) the layers' RMSNorm, RoPE and SwiGLU go through the fused ops of
our C++ extension (fused_ops.py), falling back to torch when it did not build.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

log = logging.getLogger("seesaw_mc")


@dataclass
class KernelChoice:
    rmsnorm: str
    skipped: Dict[str, str] = field(default_factory=dict)
    """Candidates not chosen -> why."""
    _fn: Optional[Callable] = None
    fused: bool = False
    """The layers run fused_ops (CPU): RoPE, residual add + RMSNorm, silu * up."""

    def describe(self) -> str:
        why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        fused = ", fused rope/add+rmsnorm/silu*mul" if self.fused else ""
        return f"rmsnorm={self.rmsnorm}{fused}" + (f" (skipped {why})" if why else "")


def _deepspeed_rmsnorm(hidden: int, dtype: torch.dtype, eps: float) -> Callable:
    from deepspeed.inference.v2.kernels.core_ops import CUDARMSNorm

    kernel = CUDARMSNorm(hidden, dtype, epsilon=eps)  # builds/loads the CUDA op; raises if it cannot

    def run(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(x2)
        kernel(out, x2, norm.weight)
        return out.view_as(x)

    return run


def _apex_rmsnorm(hidden: int, dtype: torch.dtype, eps: float) -> Callable:
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    def run(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm_affine(x, norm.weight, (hidden,), eps)

    return run


def _torch_rmsnorm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def _cpu_fused(choice: KernelChoice, requested: str, dtype: torch.dtype) -> KernelChoice:
    from seesaw_mc.model import fused_ops

    ok, why = fused_ops.available(dtype) if requested != "torch" else (False, "--kernels torch")
    if not ok:
        choice.skipped["fused"] = why
        return choice
    return KernelChoice("cpu-op", choice.skipped, fused_ops.rms_norm, fused=True)


TORCH_KERNELS = KernelChoice("torch", _fn=_torch_rmsnorm)
_BUILDERS = {"deepspeed": _deepspeed_rmsnorm, "apex": _apex_rmsnorm}
_CACHE: Dict[tuple, KernelChoice] = {}


def select_kernels(requested: str, device: torch.device, dtype: torch.dtype, hidden: int, eps: float,
                   log_once: bool = True) -> KernelChoice:
    """Pick the RMSNorm implementation for this device (cached per process)."""
    from seesaw_mc.config import Kernels

    requested = Kernels.parse(requested, "kernels")
    key = (requested, str(device), dtype, hidden, eps, os.environ.get("SEESAW_FUSED_OPS"))
    if key in _CACHE:
        return _CACHE[key]
    order = ["deepspeed", "apex"] if requested == "auto" else ([requested] if requested != "torch" else [])
    choice = KernelChoice("torch", _fn=_torch_rmsnorm)
    for name in order:
        if device.type != "cuda":
            choice.skipped[name] = "CUDA-only"
            continue
        try:
            fn = _BUILDERS[name](hidden, dtype, eps)
        except Exception as e:  # ImportError, a failed JIT build, an unsupported shape/dtype...
            msg = next((ln for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)
            choice.skipped[name] = msg.strip()[:120]
            continue
        choice = KernelChoice(name, choice.skipped, fn)
        break
    if device.type == "cpu":
        choice = _cpu_fused(choice, requested, dtype)
    _CACHE[key] = choice
    if log_once:
        log.info("kernels: %s", choice.describe())
    return choice


def rmsnorm(choice: KernelChoice, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return choice._fn(norm, x)
