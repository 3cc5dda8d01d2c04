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
    block_tables: Optional[torch.Tensor] = None
    """Decode: [B, max_blocks] block ids, padded with 0."""
    context_lens: Optional[torch.Tensor] = None
    """Decode: [B] tokens each sequence attends to (this step's token included)."""
    logits_indices: Optional[torch.Tensor] = None
    """Rows of the final hidden state whose logits are needed (last token of each sequence)."""


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
    # Decode: one query token per sequence; gather its blocks and mask the padding.
    bt = meta.block_tables
    b, nblk = bt.shape
    _, bs, hkv, d = k_cache.shape
    kk = k_cache[bt].view(b, nblk * bs, hkv, d).transpose(1, 2)
    vv = v_cache[bt].view(b, nblk * bs, hkv, d).transpose(1, 2)
    mask = torch.arange(nblk * bs, device=q.device)[None, :] < meta.context_lens[:, None]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kk, vv, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)
    return o.squeeze(2)
