"""TP shard rules (temporary home until the model_spec merge)."""
from __future__ import annotations

import math

import torch


def _row(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim=1)[rank]


def _qkv(full: torch.Tensor, rank: int, size: int, num_groups: int) -> torch.Tensor:
    # Rows are packed per query group; a TP rank owns whole groups.
    grouped = full.reshape(num_groups, -1, *full.shape[1:])
    return grouped.chunk(size, dim=0)[rank].reshape(-1, *full.shape[1:])


def _fc1(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    # Full tensor is [gate; up]; a rank's shard is [gate_r; up_r] (a copy).
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def fc1_interleave_factor(ffn_hidden_size: int, tp_degrees) -> int:
    """How many [gate_c; up_c] pairs the master fc1 is stored as: the lcm of the layouts' TP
    degrees, so that every layout's TP shard is a contiguous run of pairs (a view)."""
    m = 1
    for t in tp_degrees:
        m = m * t // math.gcd(m, t)
    return m if ffn_hidden_size % m == 0 else 1


def interleave_fc1(full: torch.Tensor, pairs: int) -> torch.Tensor:
    """[gate; up] -> [gate_0; up_0; gate_1; up_1; ...] with `pairs` chunks each."""
    if pairs == 1:
        return full
    gate, up = full.chunk(2, dim=0)
    rest = full.shape[1:]
    return torch.stack([gate.reshape(pairs, -1, *rest), up.reshape(pairs, -1, *rest)], dim=1).reshape(full.shape)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


def _vocab(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    padded = padded_vocab_size(full.shape[0], size)
    if padded != full.shape[0]:
        full = torch.cat([full, full.new_zeros(padded - full.shape[0], *full.shape[1:])])
    return full.chunk(size, dim=0)[rank]


def shard_tensor(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, num_kv_heads: int,
                 fc1_pairs: int = 1) -> torch.Tensor:
    """The TP shard of a full Megatron-named tensor (a view when tp_size == 1). fc1_pairs: how
    the master linear_fc1 is interleaved (see interleave_fc1)."""
    if tp_size == 1:
        return full
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return _qkv(full, tp_rank, tp_size, num_kv_heads)
    if name.endswith("linear_fc1.weight"):
        if fc1_pairs % tp_size == 0 and fc1_pairs > 1:
            return full.chunk(tp_size, dim=0)[tp_rank]  # whole pairs: a view
        return _fc1(full, tp_rank, tp_size)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return _row(full, tp_rank, tp_size)
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return _vocab(full, tp_rank, tp_size)
    if name.endswith("layernorm.weight"):
        return full
    raise KeyError(f"no sharding rule for {name}")
