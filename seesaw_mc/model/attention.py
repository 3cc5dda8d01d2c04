"""Paged attention over a block-table KV cache, and the per-step metadata it reads.

The runner publishes one `AttnMetadata` per step with `set_attn_metadata`; attention layers
read it with `get_attn_metadata` instead of threading it through every forward signature.

Device cache layout per layer: k, v each [num_blocks, block_size, kv_heads, head_dim]
(token-major inside a block so that slot = block * block_size + offset indexes a flat view).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F


@dataclass
class AttnMetadata:
    is_prefill: bool
    positions: torch.Tensor
    """[T] position of every token in the step."""
    slot_mapping: torch.Tensor
    """[T] flat cache slot each token's K/V is written to."""
    cu_seqlens: Optional[List[int]] = None
    """Prefill: token offsets of each sequence in the packed batch (len B+1)."""
    logits_indices: Optional[torch.Tensor] = None
    """Rows of the final hidden state whose logits are needed (last token of each sequence)."""
    decode_chunks: Optional[List[tuple]] = None
    """Decode: (row_start, row_end, block_tables, mask) per group of sequences of similar
    length (rows sorted by length), so that gathering K/V pads each group only to its own
    longest sequence instead of the whole batch's."""


_META: Optional[AttnMetadata] = None


def set_attn_metadata(meta: Optional[AttnMetadata]) -> None:
    global _META
    _META = meta


def get_attn_metadata() -> AttnMetadata:
    assert _META is not None, "attention called outside a runner step"
    return _META


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor) -> None:
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k)
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (this step's tokens) -> [T, H, D]."""
    meta = get_attn_metadata()
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    if meta.is_prefill:
        # Whole prompts only (no cached prefix): attend over the fresh K/V, causally.
        out = torch.empty_like(q)
        cu = meta.cu_seqlens
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            o = F.scaled_dot_product_attention(
                q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0),
                v[s:e].transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        return out
    # Decode: one query token per sequence; gather each group's blocks, mask the padding.
    out = torch.empty_like(q)
    _, bs, hkv, d = k_cache.shape
    for start, end, bt, mask in meta.decode_chunks:
        b, nblk = bt.shape
        flat = bt.reshape(-1)
        kk = k_cache.index_select(0, flat).view(b, nblk * bs, hkv, d).transpose(1, 2)
        vv = v_cache.index_select(0, flat).view(b, nblk * bs, hkv, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[start:end].unsqueeze(2), kk, vv, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out[start:end] = o.squeeze(2)
    return out


def decode_chunks(context_lens: List[int], block_tables: List[List[int]], block_size: int, device,
                  max_rows: int = 64, slack: float = 1.25) -> List[tuple]:
    """Group rows (already sorted by length) so each group's padded size stays within
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
