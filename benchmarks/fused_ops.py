"""Fused elementwise ops against torch's chain, as one decoder layer calls them: us, min over rounds.

A/B interleaved in one process at the engine's shapes (hidden 512, 8 q / 4 kv heads, head_dim 64,
ffn 1408, fp32). Per op, what the layer ran before -> the fused op:
  rope:  megatron's _apply_rotary_pos_emb_bshd on q and k (cos/sin recomputed per call) plus the
         reshape copies -> one in-place call on the qkv buffer (cos/sin rows made once per step,
         not timed) plus the same copies;
  norm:  x + delta, then torch.nn.RMSNorm -> add_rms_norm (residual updated in place);
  swiglu: chunk, silu(gate) * up -> silu_and_mul.
One thread is timed in CPU time (robust to a loaded host), more threads in wall time.

    python benchmarks/fused_ops.py --threads 1,2 --tokens 1,64,256,2048
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paged_attention import timed  # noqa: E402  (benchmarks/: one timing rule for the microbenchmarks)
from seesaw_mc.model import fused_ops  # noqa: E402
from seesaw_mc.parallel import megatron_adapter as mc  # noqa: E402

HIDDEN, H, HKV, D, FFN = 512, 8, 4, 64, 1408


def rope_case(t: int):
    table = mc.rotary_table(SimpleNamespace(head_dim=D, rope_theta=10000.0), 4096, torch.device("cpu"))
    pos = torch.randint(0, 4096, (t,))
    freqs, rows = table[pos], fused_ops.rope_rows(*fused_ops.rope_tables(table), pos)
    qkv = torch.randn(t, HKV, H // HKV + 2, D)

    def torch_path():
        q = qkv[:, :, :-2].reshape(t, 1, H, D)
        k = qkv[:, :, -2:-1].reshape(t, 1, HKV, D)
        mc.apply_rope(q, freqs), mc.apply_rope(k, freqs)

    def fused():
        fused_ops.rotary_(qkv[:, :, :-1], rows)
        qkv[:, :, :-2].reshape(t, H, D), qkv[:, :, -2:-1].reshape(t, HKV, D)

    return torch_path, fused


def norm_case(t: int):
    norm = torch.nn.RMSNorm(HIDDEN, eps=1e-5)
    residual, delta = torch.randn(t, HIDDEN), torch.randn(t, HIDDEN) * 1e-3
    return (lambda: norm(residual + delta)), (lambda: fused_ops.add_rms_norm(delta, residual, norm))


def swiglu_case(t: int):
    h = torch.randn(t, 2 * FFN)

    def torch_path():
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    return torch_path, (lambda: fused_ops.silu_and_mul(h, 1))


CASES = {"rope": rope_case, "norm": norm_case, "swiglu": swiglu_case}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", default="1,64,256,2048")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    ok, why = fused_ops.available(torch.float32)
    if not ok:
        sys.exit(f"fused ops unavailable: {why}")
    torch.manual_seed(0)
    print("| threads | tokens | op | torch us | fused us | speed-up |")
    print("|---|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for t in map(int, args.tokens.split(",")):
            for name, make in CASES.items():
                fns = make(t)
                reps = max(3, int(20000 / (t + 20)))
                us = [float("inf")] * 2
                with torch.inference_mode():
                    for _ in range(2):  # interleaved: A B A B
                        for i, f in enumerate(fns):
                            us[i] = min(us[i], timed(f, reps, args.rounds))
                print(f"| {threads} | {t} | {name} | {us[0]:.1f} | {us[1]:.1f} | {us[0] / us[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
