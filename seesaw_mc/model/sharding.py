"""Tensor-parallel rules for full Megatron-named tensors: the split (a full tensor -> the shard a
TP rank owns, the way megatron-core's column/row/vocab-parallel layers partition it) and, next
to each, its inverse (the shards of all TP ranks -> the full tensor, for legacy checkpoints).

Re-sharding to another layout means running the split again with the new (tp_rank, tp_size).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from seesaw_mc.errors import ModelError


def tp_rule(name: str, gated: bool = True) -> Optional[str]:
    """How TP partitions tensor `name`: "qkv", "fc1" (gated [gate; up]), "column", "row",
    "vocab", "replicated", or None. Biases follow their layer the Megatron way: a column-parallel
    bias is split with its rows; a row-parallel bias is whole on every rank (added once, after
    the all-reduce)."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return "qkv"
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return "fc1" if gated else "column"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "vocab"
    # Norms (q/k norms too), row-parallel biases, learned positions. torch_dist checkpoints of
    # the local spec store the norms under TE-style keys (layer_norm_weight / layer_norm_bias).
    if name.endswith(("layernorm.weight", "layernorm.bias", "layer_norm_weight", "layer_norm_bias",
                      "linear_proj.bias", "linear_fc2.bias", "position_embeddings.weight")):
        return "replicated"
    return None


# ---- row-parallel (linear_proj, linear_fc2): input features split ------------------------------
def _split_row(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=1)[rank]


def _merge_row(shards: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(shards, dim=1)


def lcm_of(tp_degrees) -> int:
    m = 1
    for t in tp_degrees:
        m = m * t // math.gcd(m, t)
    return m


def chunk_row(full: torch.Tensor, chunks: int) -> torch.Tensor:
    """[out, in] -> [chunks, out, in/chunks], contiguous: a row-parallel shard of [out, in] is a
    strided column slice, and a strided pinned source makes a GPU copy synchronous (it is made
    contiguous in pageable memory first). Stored this way, with `chunks` the lcm of the layouts'
    TP degrees, every layout's shard is a contiguous run of chunks. Unchanged if `in` does not
    divide."""
    if chunks == 1 or full.dim() != 2 or full.shape[1] % chunks:
        return full
    return full.reshape(full.shape[0], chunks, -1).permute(1, 0, 2).contiguous()


def unchunk_row(shard: torch.Tensor) -> torch.Tensor:
    """A run of chunk_row chunks [m, out, in/chunks] -> the [out, m * in/chunks] weight."""
    return shard.permute(1, 0, 2).reshape(shard.shape[1], -1)


def shard_shape(shard: torch.Tensor) -> tuple:
    return (shard.shape[1], shard.shape[0] * shard.shape[2]) if shard.dim() == 3 else tuple(shard.shape)


# ---- linear_qkv: rows packed per query group, a rank owns whole groups ------------------------
def _split_qkv(full: torch.Tensor, rank: int, size: int, num_groups: int) -> torch.Tensor:
    grouped = full.reshape(num_groups, -1, *full.shape[1:])
    return grouped.chunk(size, dim=0)[rank].reshape(-1, *full.shape[1:])


def _merge_column(shards: List[torch.Tensor]) -> torch.Tensor:
    """qkv (whole groups, in rank order), a plain fc1, embedding and output layer (vocab rows in
    rank order)."""
    return torch.cat(shards, dim=0)


# ---- linear_fc1: full is [gate; up], a rank's shard is [gate_r; up_r] -------------------------
def _split_fc1(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def _merge_fc1(shards: List[torch.Tensor]) -> torch.Tensor:
    # Plain concatenation would interleave gates and ups: all gates first, then all ups.
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def fc1_interleave_factor(ffn_hidden_size: int, tp_degrees) -> int:
    """How many [gate_c; up_c] pairs the master fc1 is stored as: the lcm of the layouts' TP
    degrees, so that every layout's TP shard is a contiguous run of pairs (a view)."""
    m = lcm_of(tp_degrees)
    return m if ffn_hidden_size % m == 0 else 1


def interleave_fc1(full: torch.Tensor, pairs: int) -> torch.Tensor:
    """[gate; up] -> [gate_0; up_0; gate_1; up_1; ...] with `pairs` chunks each."""
    if pairs == 1:
        return full
    gate, up = full.chunk(2, dim=0)
    rest = full.shape[1:]
    return torch.stack([gate.reshape(pairs, -1, *rest), up.reshape(pairs, -1, *rest)], dim=1).reshape(full.shape)


# ---- vocab-parallel (embedding, output layer): rows split, padded to a multiple of tp --------
def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _split_vocab(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    padded = padded_vocab_size(full.shape[0], size)
    if padded != full.shape[0]:
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    return full.chunk(size, dim=0)[rank]


# ---- the two directions -----------------------------------------------------------------------
def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, num_kv_heads: int,
                 fc1_pairs: int = 1, gated: bool = True) -> torch.Tensor:
    """The TP shard of a full Megatron-named tensor (a view when tp_size == 1). fc1_pairs: how
    the master linear_fc1 is interleaved (see interleave_fc1); gated: linear_fc1 is [gate; up]."""
    if tp_size == 1:
        return full
    rule = tp_rule(name, gated)
    if rule == "qkv":
        return _split_qkv(full, tp_rank, tp_size, num_kv_heads)
    if rule == "fc1":
        if fc1_pairs % tp_size == 0 and fc1_pairs > 1:
            return full.chunk(tp_size, dim=0)[tp_rank]  # whole pairs: a view
        return _split_fc1(full, tp_rank, tp_size)
    if rule == "row":
        if full.dim() == 3:  # chunk_row's layout: whole chunks, contiguous
            return full.chunk(tp_size, dim=0)[tp_rank]
        return _split_row(full, tp_rank, tp_size)
    if rule == "column":
        return full.chunk(tp_size, dim=0)[tp_rank]
    if rule == "vocab":
        return _split_vocab(full, tp_rank, tp_size)
    if rule == "replicated":
        return full
    raise KeyError(f"no sharding rule for {name}")


def merge_tp(name: str, shards: List[torch.Tensor], where: str, gated: bool = True) -> torch.Tensor:
    """The full tensor from every TP rank's shard of `name` (Megatron's split, inverted)."""
    if len(shards) == 1:
        return shards[0]
    rule = tp_rule(name, gated)
    if rule == "replicated":
        if any(not torch.equal(shards[0], s) for s in shards[1:]):
            raise ModelError(f"{where}: replicated tensor {name} differs between TP ranks")
        return shards[0]
    if rule == "row":
        return _merge_row(shards)
    if rule == "fc1":
        return _merge_fc1(shards)
    return _merge_column(shards)
