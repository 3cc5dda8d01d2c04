"""Fused elementwise ops of a decoder layer on CPU (`csrc/fused_ops.cpp`, built into the
paged-attention extension, paged_attn_ext.py): RoPE in place from cos/sin rows computed once per
step for all layers, residual add + RMSNorm in one pass, and silu(gate) * up straight from
linear_fc1's output (its `pairs` interleave included). vLLM's CPU build has the same trio.

Why: after the linear layers, torch's elementwise chain was 12-15% of a CPU step (profile of a
30M Llama, 2 threads: mul 4.3%, silu 2.6%, add 1.4%, cat 0.9%, copy_ 0.9%, rms_norm 0.6%, pow,
cos, sin, neg, sum): megatron's RoPE recomputes cos/sin for every layer and for q and k apart,
then runs mul/chunk/neg/cat/mul/add, each a pass over memory with a fresh temporary.

Per layer call, us, torch -> fused (`benchmarks/fused_ops.py`: fp32, hidden 512, 8 q / 4 kv heads
of 64, ffn 1408; 1 thread in CPU time, 2 in wall time, min of interleaved rounds, quiet host):
    threads  tokens  rope (q and k)       add + RMSNorm        silu(gate) * up
    1        1       224 -> 30     7.4x   51 -> 9.9     5.2x   15 -> 7.6       2.0x
    1        64      364 -> 59     6.2x   83 -> 26      3.2x   171 -> 79       2.2x
    1        256     837 -> 109    7.7x   152 -> 68     2.2x   634 -> 292      2.2x
    1        2048    15857 -> 990  16x    3194 -> 717   4.5x   9418 -> 4742    2.0x
    2        1       239 -> 32     7.5x   52 -> 9.8     5.3x   14 -> 7.1       2.0x
    2        64      269 -> 35     7.6x   78 -> 15      5.2x   96 -> 42        2.3x
    2        256     776 -> 62     12x    112 -> 32     3.5x   353 -> 171      2.1x
    2        2048    17611 -> 465  38x    803 -> 213    3.8x   4618 -> 2266    2.0x
Every op wins at every shape, so the three are switched together. silu needs a vectorised exp
(fused_ops.cpp): with a scalar expf per element it was 3.3x slower than torch's at 64-256 tokens.

Whole engine (`benchmarks/fused_engine_ab.py`: 30M random Llama, fp32, 2 threads, 100 random
requests, runs with and without interleaved, host shared with other work): output tokens/s
fused 272.5 (median of 4, 241-295) against torch 247.0 (232-279); fused/torch per adjacent pair
1.057, 1.040, 1.136, 1.069, and in an earlier run of 3 pairs 1.104, 1.130, 0.930: median of all
seven 1.07x.

Chosen with the RMSNorm kernel (kernels.py) and logged once: on CPU, unless `--kernels torch`,
for RMSNorm models in fp32/bf16, when the extension built. LayerNorm models (GPT-2), CUDA and a
failed build keep torch. SEESAW_FUSED_OPS=0 turns these ops off alone (for A/B runs; `--kernels
torch` would also drop the oneDNN linears).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import nn

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class RopeRows:
    """cos and sin [T, head_dim/2] (fp32) of this step's positions, shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor


def available(dtype: torch.dtype) -> Tuple[bool, str]:
    """(True, "") or (False, why not)."""
    if os.environ.get("SEESAW_FUSED_OPS", "1") == "0":
        return False, "SEESAW_FUSED_OPS=0"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"not for {dtype}"
    from seesaw_mc.model import paged_attn_ext

    op, why = paged_attn_ext.load_op()
    if op is None:
        return False, why
    try:
        op.add_rms_norm, op.rotary_embedding_, op.silu_and_mul
    except (AttributeError, RuntimeError):  # an extension built before these ops
        return False, "the built extension lacks them (rebuild: python -m seesaw_mc.model.paged_attn_ext build)"
    return True, ""


def rope_tables(freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Megatron's angle table [max_len, 1, 1, D] (two equal halves) -> cos, sin [max_len, D/2] fp32."""
    half = freqs[:, 0, 0, : freqs.shape[-1] // 2].float().contiguous()
    return torch.cos(half), torch.sin(half)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> RopeRows:
    return RopeRows(cos.index_select(0, positions), sin.index_select(0, positions))


def rotary_(x: torch.Tensor, rope: RopeRows) -> None:
    """Rotate x [T, A, B, D] in place (D contiguous, any other strides), e.g. q and k inside the
    fused qkv buffer viewed as [T, kv_heads, group + 2, D][:, :, :-1]."""
    torch.ops.seesaw.rotary_embedding_(x, rope.cos, rope.sin)


def add_rms_norm(delta, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """residual += delta (in place; skipped when delta is None); returns norm(residual)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(residual.dtype).eps
    return torch.ops.seesaw.add_rms_norm(delta, residual, norm.weight, eps)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return add_rms_norm(None, x.contiguous(), norm)


def silu_and_mul(h: torch.Tensor, pairs: int) -> torch.Tensor:
    """h [T, 2F] as `pairs` chunks [gate_c; up_c] -> silu(gate) * up [T, F]."""
    return torch.ops.seesaw.silu_and_mul(h, pairs)
