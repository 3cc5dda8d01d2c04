"""Paged attention over a block-table KV cache, and the per-step metadata it reads.

The runner publishes one `AttnMetadata` per micro-batch with `set_attn_metadata` (built by
`prefill_metadata` / `decode_metadata`); attention layers read it with `get_attn_metadata`
instead of threading it through every forward signature. Tensors derived from it (the int32
block tables, the flex block mask, the gather fallback's chunks) are built on first use and
shared by every layer of the step.

Device cache per layer: k, v each indexed [num_blocks, block_size, kv_heads, head_dim]; a token's
slot is block * block_size + offset. In memory the blocks are head-major
([kv_heads, block_size, head_dim] each) where the CPU op reads them, token-major elsewhere
(`kv_head_major`). K/V are written by (block, offset), so every kernel takes either.

Kernels, chosen once per process (`attention_backend`) and logged once:
  - CPU: `paged_attn_ext`, a C++ op JIT-built like DeepSpeed's ops, reads K/V where they lie.
    Decode, one layer's call with its K/V write, us (`benchmarks/paged_attention.py`: head_dim
    64, 8 q / 4 kv heads, block 16, shuffled blocks, lengths 0.5x-1.5x around the middle one;
    1 thread in CPU time, 2 in wall time, min of interleaved rounds, quiet host):
        threads  batch  lengths    gather+SDPA   op      speed-up
        1        1      16         87            24      3.7x
        1        1      600        375           122     3.1x
        1        16     50-143     999           268     3.7x
        1        16     300-862    14563         6232    2.3x
        1        64     8-23       931           302     3.1x
        1        64     300-890    113877        23767   4.8x
        2        1      300        251           56      4.5x
        2        16     150-431    3282          606     5.4x
        2        64     50-148     5541          2485    2.2x
        2        64     300-890    28953         13142   2.2x
    (all 24 cases: 2.1x-5.9x). Decode is memory-bound: the op reads each K/V byte once, where
    the gather read it, wrote a copy, and SDPA read the copy. The table is for token-major
    blocks. Head-major blocks, where a (block, head) tile of K or V is one contiguous run
    (4 KiB here), are faster still: 64 sequences x 160 tokens, 8 q / 4 kv heads, head_dim 64,
    2 threads, 1.41-1.55 ms per layer against 2.10-2.48 ms token-major (13.5-14.9 against
    8.4-10.0 GB/s), identical output; 64 x 150-445 tokens, 3.85 against 5.80 ms. Heads
    outermost in the whole cache ([kv_heads, num_blocks, ...]) measured 1.93-2.26 ms: a
    sequence's heads then lie far apart. So the CPU cache is head-major per block.
    FlexAttention on CPU was measured and rejected: inductor's C++ flex template took 15.6 s
    to compile the first shape and 11 s again for the next batch size (dynamic=True emits C++
    that does not compile in torch 2.13: undeclared cur_kvSplitSize), so start-up would blow
    the 10 s budget and every new shape would stall a step; steady state it took 6.3 ms for
    16 x 300 tokens, where the op takes about 3.5 ms.
  - CUDA: FlexAttention with the same page table, compiled to Triton (`paged_flex.py`), for
    decode and for prompts with a cached prefix; whole prompts keep SDPA per sequence (flash)
    until a GPU measures the packed single call against it. torch's own
    `varlen_attn(block_table=...)` is flash-attention 2, which needs pages of a multiple of 256
    tokens and fp16/bf16, so it cannot serve a 16-token fp32 cache.
  - Fallback (the op does not build, flex does not compile): gather + SDPA, as before; the
    reason is logged once, nothing raises.
Prefill without a cached prefix: prompts up to `OP_PREFILL_MAX_LEN` tokens go through the op
in one call, longer ones through SDPA over the fresh K/V one by one. SDPA's CPU flash kernel
blocks its matmuls and wins on long prompts, the op wins on short ones (us, SDPA loop vs op in
one call; 1 thread: 1 x 16 tokens 127 vs 52, 1 x 64 275 vs 322, 1 x 100 585 vs 765, 1 x 300
4195 vs 6500, 16 x 8-23 1166 vs 446; 2 threads: 1 x 64 383 vs 214, 1 x 300 1865 vs 3174).
On a mixed batch the split beats both (16 x 150-431, 1 thread: SDPA loop 77429, one call
104424, split 64650). Prompts with a cached prefix always go through
the op (or flex).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from seesaw_mc.model import attention_fallback as fallback
from seesaw_mc.model import paged_attn_ext

log = logging.getLogger("seesaw_mc")

OP_PREFILL_MAX_LEN = 64
"""No-prefix prefill: prompts up to this many tokens go through the op in one call, longer ones
through SDPA one by one (the crossover measured between 64 and 100 tokens, see above)."""


@dataclass
class AttnMetadata:
    is_prefill: bool
    positions: torch.Tensor
    """[T] position of every token in the step."""
    slot_mapping: torch.Tensor
    """[T] flat cache slot each token's K/V is written to (block * block_size + offset)."""
    cu_seqlens: List[int]
    """Query-token offsets of each sequence in the packed batch (len S+1; decode: 0..S)."""
    context_lens: List[int]
    """Per sequence: tokens in its blocks once this step's are written (cached prefix + queries)."""
    block_tables: List[List[int]]
    """Per sequence: its cache blocks, in order."""
    block_size: int
    logits_indices: Optional[torch.Tensor] = None
    """Rows of the final hidden state whose logits are needed (last token of each sequence)."""
    derived: Dict[str, object] = field(default_factory=dict, repr=False)
    """Tensors built from the above on first use, shared by all layers of the step."""
    query_lens: List[int] = field(init=False)
    has_prefix: bool = field(init=False)
    """Some sequence attends to K/V cached before this step (chunked prefill, a shared prefix)."""

    def __post_init__(self):
        self.query_lens = [b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:])]
        self.has_prefix = any(c > q for c, q in zip(self.context_lens, self.query_lens))

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def paged_tensors(self):
        """(block_tables [S, max_blocks] int32, cu_q [S+1] int32, context_lens [S] int32)."""
        if "paged" not in self.derived:
            width = max(len(t) for t in self.block_tables)
            bt = torch.tensor([t + [0] * (width - len(t)) for t in self.block_tables], dtype=torch.int32)
            cu = torch.tensor(self.cu_seqlens, dtype=torch.int32)
            ctx = torch.tensor(self.context_lens, dtype=torch.int32)
            self.derived["paged"] = tuple(x.to(self.device) for x in (bt, cu, ctx))
        return self.derived["paged"]

    def slot_index(self):
        """(blocks [T], offsets [T]): where each of this step's tokens goes, for `write_kv`."""
        if "slots" not in self.derived:
            self.derived["slots"] = (torch.div(self.slot_mapping, self.block_size, rounding_mode="floor"),
                                     self.slot_mapping % self.block_size)
        return self.derived["slots"]


def prefill_metadata(block_tables: List[List[int]], query_lens: List[int], num_cached: List[int], block_size: int,
                     device, sample: Optional[List[bool]] = None) -> AttnMetadata:
    """Sequence s computes tokens num_cached[s] .. num_cached[s] + query_lens[s] - 1; the K/V of
    the first num_cached[s] are already in its blocks (0 for a whole prompt). Logits are taken
    at the last token of the sequences `sample` marks (default: all; a piece of a prompt cut
    between micro-batches samples nothing)."""
    pos, slots, cu = [], [], [0]
    for bt, n, c in zip(block_tables, query_lens, num_cached):
        if n < 1 or c < 0:
            raise ValueError(f"a prefill needs at least 1 query token after 0 or more cached (got {n} after {c})")
        if len(bt) * block_size < c + n:
            raise ValueError(f"prefill of {n} tokens after {c} cached needs more than {len(bt)} blocks "
                             f"of {block_size}")
        span = range(c, c + n)
        pos.extend(span)
        slots.extend(bt[p // block_size] * block_size + p % block_size for p in span)
        cu.append(cu[-1] + n)
    last = [end - 1 for end, keep in zip(cu[1:], sample or [True] * len(query_lens)) if keep]
    return AttnMetadata(True, torch.tensor(pos, device=device), torch.tensor(slots, device=device), cu,
                        [c + n for c, n in zip(num_cached, query_lens)], block_tables, block_size,
                        logits_indices=torch.tensor(last, dtype=torch.long, device=device))


def decode_metadata(block_tables: List[List[int]], context_lens: List[int], block_size: int,
                    device) -> AttnMetadata:
    """One new token per sequence, the context_lens[s]-th (its K/V are written this step)."""
    slots = [bt[(n - 1) // block_size] * block_size + (n - 1) % block_size for bt, n in zip(block_tables, context_lens)]
    return AttnMetadata(False, torch.tensor([n - 1 for n in context_lens], device=device),
                        torch.tensor(slots, device=device), list(range(len(context_lens) + 1)), list(context_lens),
                        block_tables, block_size)


_META: Optional[AttnMetadata] = None


def set_attn_metadata(meta: Optional[AttnMetadata]) -> None:
    global _META
    _META = meta


def get_attn_metadata() -> AttnMetadata:
    assert _META is not None, "attention called outside a runner step"
    return _META


# -- which kernel ------------------------------------------------------------------------------
_BACKENDS: Dict[str, tuple] = {}  # device type -> (name, op or None)
_FORCED: Optional[str] = None


def set_attention_backend(name: Optional[str]) -> None:
    """Force "sdpa" (the gather fallback), "op", "flex", or None for the automatic choice."""
    global _FORCED
    if name not in (None, "sdpa", "op", "flex"):
        raise ValueError(f"unknown attention backend {name!r} (sdpa, op, flex)")
    _FORCED = name
    _BACKENDS.clear()


def _disable(device_type: str, name: str, why: str) -> tuple:
    log.warning("paged attention: %s is unavailable (%s); using gather + SDPA", name, why)
    _BACKENDS[device_type] = ("sdpa", None)
    return _BACKENDS[device_type]


def attention_backend(device: torch.device) -> tuple:
    """(name, op) for this device type, chosen once per process and logged once."""
    if device.type in _BACKENDS:
        return _BACKENDS[device.type]
    want = _FORCED or ("flex" if device.type == "cuda" else "op")
    if want == "op":
        op, why = paged_attn_ext.load_op() if device.type == "cpu" else (None, f"it is CPU-only, not for {device.type}")
        if op is None:
            return _disable(device.type, "the CPU paged-attention op", why)
        _BACKENDS[device.type] = ("op", op)
    elif want == "flex":
        from seesaw_mc.model import paged_flex

        why = paged_flex.unavailable(device)
        if why:
            return _disable(device.type, "FlexAttention", why)
        _BACKENDS[device.type] = ("flex", None)
    else:
        _BACKENDS[device.type] = ("sdpa", None)
    log.info("paged attention: %s on %s", _BACKENDS[device.type][0], device.type)
    return _BACKENDS[device.type]


# -- the call --------------------------------------------------------------------------------
def kv_head_major(device: torch.device, head_dim: int) -> bool:
    """Whether this device's KV blocks are head-major in memory: where the CPU op reads them.
    FlexAttention needs one stride between a head's tokens across the whole cache, so CUDA and
    the fallbacks keep token-major blocks."""
    name, _ = attention_backend(device)
    return name == "op" and paged_attn_ext.supports(head_dim)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: AttnMetadata) -> None:
    """This step's k/v [T, Hkv, D] into their slots, in either block layout (index_put_ by
    (block, offset) costs the same as index_copy_ over a flat token-major view: 20-25 us for
    64 tokens, 310-330 us for 2048, 4 kv heads of 64)."""
    where = meta.slot_index()
    k_cache.index_put_(where, k)
    v_cache.index_put_(where, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D], k/v [T, Hkv, D] (this step's tokens) -> [T, H, D]."""
    meta = get_attn_metadata()
    write_kv(k_cache, v_cache, k, v, meta)
    name, op = attention_backend(q.device)
    if name == "op" and not paged_attn_ext.supports(q.shape[-1]):
        name, op = "gather", None  # e.g. GPT-2-style head_dim 12: the gather + SDPA fallback
    if meta.is_prefill and not meta.has_prefix:
        return _prefill_fresh(q, k, v, k_cache, v_cache, scale, meta, op)
    if name == "op":
        return paged_attn_ext.paged_attention(op, q, k_cache, v_cache, *meta.paged_tensors(), scale)
    if name == "flex":
        from seesaw_mc.model import paged_flex

        try:
            return paged_flex.paged_attention(q, k_cache, v_cache, meta, scale)
        except Exception as e:  # no triton, a compile failure: once, then the fallback for good
            _disable(q.device.type, "FlexAttention", next(iter(str(e).splitlines()), type(e).__name__)[:160])
    if meta.is_prefill:
        return fallback.prefill_gather(q, k_cache, v_cache, meta, scale)
    return fallback.decode_gather(q, k_cache, v_cache, meta, scale)


def _prefill_fresh(q, k, v, k_cache, v_cache, scale, meta: AttnMetadata, op) -> torch.Tensor:
    """Whole prompts: SDPA over the fresh K/V for long ones, the op in one call for short ones."""
    run_op = paged_attn_ext.paged_attention
    if op is not None and max(meta.query_lens) <= OP_PREFILL_MAX_LEN:
        return run_op(op, q, k_cache, v_cache, *meta.paged_tensors(), scale)
    out = torch.empty_like(q)
    cu, short = meta.cu_seqlens, []
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        if op is not None and e - s <= OP_PREFILL_MAX_LEN:
            short.append(i)
            continue
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1).unsqueeze(0), k[s:e].transpose(0, 1).unsqueeze(0),
            v[s:e].transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    if short:
        rows, tensors = _short_subset(meta, short)
        out.index_copy_(0, rows, run_op(op, q.index_select(0, rows), k_cache, v_cache, *tensors, scale))
    return out


def _short_subset(meta: AttnMetadata, seqs: List[int]):
    """The op's inputs for a subset of the step's sequences (rows, then paged tensors)."""
    key = ("short",) + tuple(seqs)
    if key not in meta.derived:
        cu, rows, sub_cu = meta.cu_seqlens, [], [0]
        for i in seqs:
            rows.extend(range(cu[i], cu[i + 1]))
            sub_cu.append(len(rows))
        tables = [meta.block_tables[i] for i in seqs]
        width = max(len(t) for t in tables)
        dev = meta.device
        meta.derived[key] = (torch.tensor(rows, device=dev), (
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            torch.tensor(sub_cu, dtype=torch.int32, device=dev),
            torch.tensor([meta.context_lens[i] for i in seqs], dtype=torch.int32, device=dev)))
    return meta.derived[key]
