"""Gather + SDPA: paged attention for hosts where neither the CPU op nor FlexAttention runs.

It copies each sequence's K/V out of its blocks (`index_select`) and lets SDPA read the copy
with a mask. It is what every step did before the in-place kernels (21% of CPU time in
`index_select` alone on a 1-process run), kept because it needs no compiler.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F


def decode_gather(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """One query token per sequence; gather each chunk's blocks, mask the padding."""
    if "chunks" not in meta.derived:
        meta.derived["chunks"] = decode_chunks(meta.context_lens, meta.block_tables, meta.block_size, meta.device)
    out = torch.empty_like(q)
    _, bs, hkv, d = k_cache.shape
    for start, end, bt, mask in meta.derived["chunks"]:
        b, nblk = bt.shape
        flat = bt.reshape(-1)
        kk = k_cache.index_select(0, flat).view(b, nblk * bs, hkv, d).transpose(1, 2)
        vv = v_cache.index_select(0, flat).view(b, nblk * bs, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[start:end].unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[start:end] = o.squeeze(2)
    return out


def prefill_gather(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
    """Queries that follow a cached prefix: per sequence, gather its context from the blocks and
    mask causally from the bottom right (query j sits at position context - q_len + j)."""
    out = torch.empty_like(q)
    _, bs, hkv, d = k_cache.shape
    cu = meta.cu_seqlens
    for i, (table, ctx) in enumerate(zip(meta.block_tables, meta.context_lens)):
        s, e = cu[i], cu[i + 1]
        blocks = torch.tensor(table[:-(-ctx // bs)], device=q.device)
        kk = k_cache.index_select(0, blocks).view(-1, hkv, d)[:ctx].transpose(0, 1)
        vv = v_cache.index_select(0, blocks).view(-1, hkv, d)[:ctx].transpose(0, 1)
        pos = torch.arange(ctx - (e - s), ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), kk, vv, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[s:e] = o.transpose(0, 1)
    return out


def decode_chunks(context_lens: List[int], block_tables: List[List[int]], block_size: int, device,
                  max_rows: int = 64, slack: float = 1.25) -> List[tuple]:
    """Group rows (the runner sorts them by length) so each group's padded size stays within
    `slack` of its real size; build each group's block table and mask once per step."""
    chunks, start, n = [], 0, len(context_lens)
    while start < n:
        end, total = start + 1, context_lens[start]
        while end < n and end - start < max_rows:
            width = -(-context_lens[end] // block_size) * block_size
            if width * (end + 1 - start) > slack * (total + context_lens[end]) + block_size * (end + 1 - start):
                break
            total += context_lens[end]
            end += 1
        nblk = max(len(block_tables[i]) for i in range(start, end))
        bt = torch.tensor([block_tables[i] + [0] * (nblk - len(block_tables[i])) for i in range(start, end)],
                          device=device)
        lens = torch.tensor(context_lens[start:end], device=device)
        mask = (torch.arange(nblk * block_size, device=device)[None, :] < lens[:, None])[:, None, None, :]
        chunks.append((start, end, bt, mask))
        start = end
    return chunks
