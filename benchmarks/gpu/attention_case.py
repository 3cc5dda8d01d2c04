"""One attention case for the GPU check: a paged KV cache with scattered blocks, sequences of
mixed lengths, and our paged attention against SDPA over each sequence's contiguous K/V.

Only model/attention.py's public surface is used (decode_metadata, prefill_metadata,
set_attn_metadata, paged_attention), so the check follows whatever kernel runs behind it.
"""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from probes import timed
from seesaw_mc.model.attention import decode_metadata, paged_attention, prefill_metadata, set_attn_metadata

BLOCK = 16


def _cache(device, dtype, lens, kv_heads, head_dim, gen):
    """Each sequence's K/V ([len, kv_heads, head_dim]) scattered over shuffled blocks."""
    need = [math.ceil(n / BLOCK) for n in lens]
    num_blocks = sum(need) + 1  # block 0 stays empty: decode pads block tables with it
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, at = [], 0
    for k in need:
        tables.append(order[at:at + k])
        at += k
    k_cache = torch.zeros(num_blocks, BLOCK, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    seq_k, seq_v = [], []
    for n, table in zip(lens, tables):
        k = torch.randn(n, kv_heads, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(n, kv_heads, head_dim, generator=gen).to(device, dtype)
        slots = _slots(table, range(n), device)
        k_cache.view(-1, kv_heads, head_dim)[slots] = k
        v_cache.view(-1, kv_heads, head_dim)[slots] = v
        seq_k.append(k)
        seq_v.append(v)
    return k_cache, v_cache, tables, seq_k, seq_v


def _slots(table, positions, device):
    return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions], device=device)


def _sdpa(q, k, v, scale, causal):
    """q [T, H, D], k/v [S, Hkv, D] -> [T, H, D] through SDPA, heads first."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=causal, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _decode(device, lens, q, caches, scale):
    """A callable running one decode step of paged attention (the new token's K/V is the last
    one already in the cache: writing it again changes nothing)."""
    k_cache, v_cache, tables, seq_k, seq_v = caches
    last = [n - 1 for n in lens]
    meta = decode_metadata(tables, lens, BLOCK, device)
    k_new = torch.stack([k[-1] for k in seq_k])
    v_new = torch.stack([v[-1] for v in seq_v])

    def ours():
        set_attn_metadata(meta)
        try:
            return paged_attention(q, k_new, v_new, k_cache, v_cache, scale)
        finally:
            set_attn_metadata(None)

    return ours


def run_case(device, dtype, batch: int, max_len: int, heads: int, kv_heads: int, head_dim: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    lens = sorted(rng.randint(1, max_len) for _ in range(batch))  # decode rows arrive sorted by length
    scale = 1.0 / math.sqrt(head_dim)
    caches = _cache(device, dtype, lens, kv_heads, head_dim, gen)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(device, dtype)
    ours = _decode(device, lens, q, caches, scale)
    out = ours()
    seq_k, seq_v = caches[3], caches[4]
    ref = torch.cat([_sdpa(q[i:i + 1], seq_k[i], seq_v[i], scale, False) for i in range(batch)])
    res = {"lens_min_max_sum": [min(lens), max(lens), sum(lens)],
           "decode_max_abs_diff": (out.float() - ref.float()).abs().max().item()}
    # One padded SDPA over the whole batch: what a gather-free kernel should at least match.
    k_pad = torch.zeros(batch, kv_heads, max(lens), head_dim, device=device, dtype=dtype)
    v_pad = torch.zeros_like(k_pad)
    for i, n in enumerate(lens):
        k_pad[i, :, :n], v_pad[i, :, :n] = seq_k[i].transpose(0, 1), seq_v[i].transpose(0, 1)
    mask = (torch.arange(max(lens), device=device)[None, :] < torch.tensor(lens, device=device)[:, None])[:, None, None]
    padded = lambda: F.scaled_dot_product_attention(q[:, :, None], k_pad, v_pad, attn_mask=mask, scale=scale,  # noqa
                                                    enable_gqa=True)
    res["decode_us"] = timed(ours, device, repeat=reps) * 1e6
    res["padded_sdpa_us"] = timed(padded, device, repeat=reps) * 1e6
    res["prefill_max_abs_diff"] = _prefill_diff(device, dtype, lens[-4:], heads, kv_heads, head_dim, scale, gen)
    return res


def _prefill_diff(device, dtype, lens, heads, kv_heads, head_dim, scale, gen) -> float:
    """Whole prompts packed into one step, causal: against SDPA per prompt."""
    k_cache, v_cache, tables, seq_k, seq_v = _cache(device, dtype, lens, kv_heads, head_dim, gen)
    q = [torch.randn(n, heads, head_dim, generator=gen).to(device, dtype) for n in lens]
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    meta = prefill_metadata(tables, lens, [0] * len(lens), BLOCK, device)
    set_attn_metadata(meta)
    try:
        out = paged_attention(torch.cat(q), torch.cat(seq_k), torch.cat(seq_v), k_cache, v_cache, scale)
    finally:
        set_attn_metadata(None)
    ref = torch.cat([_sdpa(q[i], seq_k[i], seq_v[i], scale, True) for i in range(len(lens))])
    return (out.float() - ref.float()).abs().max().item()
