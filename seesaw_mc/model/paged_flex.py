"""FlexAttention over the paged cache: the CUDA path (compiled to Triton).

K and V are the whole cache seen as one sequence of num_blocks * block_size slots,
[1, kv_heads, slots, head_dim] views with no copy. Which slots a query may see is said twice:
  - the BlockMask lists, per tile of queries, the 128-slot chunks of the cache that hold any of
    its sequences' blocks, so the kernel visits only those;
  - the mask_mod is exact: slot -> its block -> its logical index, and the slot is visible when
    the query's sequence has that block at that index in its table and the slot's logical
    position is at most the query's (causal; a cached prefix is just context longer than the
    queries). A block that sequences share (prefix sharing) is a common prefix, so it has the
    same logical index in every table that holds it.
Decode runs batched (query batch = sequences, one query each, K/V broadcast over the batch), so
each sequence's tile lists only its own chunks; prefill runs packed (batch 1, all prompt tokens).

Facts it leans on (torch 2.13): flex_attention accepts a query batch larger than K/V's when the
BlockMask has the query's batch; the kernels may evaluate mask_mod past the real lengths, so
every table the mask_mod indexes is padded with entries that mask everything. Nothing here
was run on a GPU yet (this host has none); on CPU the same construction is checked against
SDPA through eager flex_attention (tests/test_paged_attention.py), shared blocks included.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK = 128
"""Slots per BlockMask tile, both ways: flex's default sparse block size, which its Triton
kernels are tuned for; the mask_mod does the exact masking inside a tile."""

_COMPILED = None


def unavailable(device: torch.device) -> str:
    """Why FlexAttention cannot serve this device ("" when it can)."""
    if device.type != "cuda":
        return f"it runs compiled to Triton on CUDA, not on {device.type}"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return ""


def _flex(compiled: bool):
    global _COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _COMPILED is None:
        # dynamic: the number of tokens and of cache chunks in a step change every step.
        _COMPILED = torch.compile(flex_attention, dynamic=True, fullgraph=True)
    return _COMPILED


def _page_maps(meta, num_blocks: int):
    """logical[block] (its index in the tables that hold it), padded past the cache's last chunk
    so that any slot index the kernel may form is in range; tables [S + 1, W], each sequence's
    blocks and -1 past them, with a last row of -1 for the padded query rows (sequence -1)."""
    bt, _, ctx = meta.paged_tensors()
    bs, dev = meta.block_size, bt.device
    s, w = bt.shape
    padded = -(-num_blocks * bs // CHUNK) * CHUNK // bs + 1
    used = torch.arange(w, device=dev)[None, :] < ((ctx + bs - 1) // bs)[:, None]
    ids = bt[used].long()
    index = torch.arange(w, dtype=torch.int32, device=dev)[None, :].expand(s, w)[used]
    logical = torch.zeros(padded, dtype=torch.int32, device=dev)
    logical[ids] = index
    if not torch.equal(logical[ids], index):
        raise ValueError("a KV block shared at different positions of two sequences (only common prefixes are shared)")
    tables = torch.full((s + 1, w), -1, dtype=torch.int32, device=dev)
    tables[:s] = torch.where(used, bt, -1)
    return logical, tables, used


def _seq_chunks(meta, used: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[S, chunks] bool: which cache chunks hold some block of each sequence."""
    bt = meta.paged_tensors()[0].long()
    bs, s = meta.block_size, bt.shape[0]
    dense = torch.zeros(s, num_chunks, dtype=torch.bool, device=bt.device)
    rows = torch.arange(s, device=bt.device)[:, None].expand_as(bt)[used]
    dense[rows, (bt[used] * bs) // CHUNK] = True
    dense[rows, (bt[used] * bs + bs - 1) // CHUNK] = True  # a block that straddles two chunks
    return dense


def build_block_mask(meta, num_blocks: int):
    """The step's BlockMask (built once, shared by every layer)."""
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex", num_blocks)
    if key in meta.derived:
        return meta.derived[key]
    bs, dev = meta.block_size, meta.device
    slots = num_blocks * bs
    num_chunks = -(-slots // CHUNK)
    logical, tables, used = _page_maps(meta, num_blocks)
    seq_chunks = _seq_chunks(meta, used, num_chunks)
    q_lens = torch.tensor(meta.query_lens, device=dev)
    t = int(q_lens.sum())
    # Row r of the kernel is batch b + query q_idx (decode: b = sequence, q_idx = 0; prefill:
    # b = 0, q_idx = token); padded rows belong to no sequence and sit at position -1.
    q_seq = torch.full((t + CHUNK,), -1, dtype=torch.int32, device=dev)
    q_pos = torch.full((t + CHUNK,), -1, dtype=torch.int32, device=dev)
    q_seq[:t] = torch.repeat_interleave(torch.arange(len(q_lens), dtype=torch.int32, device=dev), q_lens)
    q_pos[:t] = meta.positions.to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        r = b + q_idx
        blk = kv_idx // bs
        pos = logical[blk]
        return (tables[q_seq[r], pos] == blk) & (pos * bs + kv_idx % bs <= q_pos[r])

    if meta.is_prefill:
        tiles = -(-t // CHUNK)
        first = torch.tensor(meta.cu_seqlens[:-1], device=dev) // CHUNK
        last = (torch.tensor(meta.cu_seqlens[1:], device=dev) - 1) // CHUNK
        tile = torch.arange(tiles, device=dev)[:, None]
        in_tile = (tile >= first[None, :]) & (tile <= last[None, :])  # [tiles, S]
        dense = (in_tile.float() @ seq_chunks.float() > 0)[None, None]  # [1, 1, tiles, chunks]
        q_len = t
    else:
        dense = seq_chunks[:, None, None, :]  # [S, 1, 1, chunks]
        q_len = 1
    kv_num = dense.sum(-1, dtype=torch.int32)
    kv_idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=(CHUNK, CHUNK), mask_mod=mask_mod,
                                    seq_lengths=(q_len, slots), compute_q_blocks=False)
    meta.derived[key] = mask
    return mask


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
                    compiled: Optional[bool] = None) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D], reading K/V in place through the step's BlockMask."""
    nb, bs, hkv, d = k_cache.shape
    if k_cache.stride(1) != hkv * d or v_cache.stride(1) != hkv * d:
        raise ValueError("FlexAttention reads token-major KV blocks; this cache is head-major")
    compiled = q.device.type == "cuda" if compiled is None else compiled
    mask = build_block_mask(meta, nb)
    k = k_cache.view(1, nb * bs, hkv, d).transpose(1, 2)
    v = v_cache.view(1, nb * bs, hkv, d).transpose(1, 2)
    if meta.is_prefill:
        query = q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    else:
        query = q.unsqueeze(2)  # [S, H, 1, D]
    out = _flex(compiled)(query, k, v, block_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1) if meta.is_prefill else out.squeeze(2)
