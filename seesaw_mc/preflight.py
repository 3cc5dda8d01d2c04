"""What the engine checks and loads before any collective or weight: the dtype, the
tokenizer, the context limit, each prompt, and the layouts against the model and the launch
(so that every rank fails alike, at once, with the same line)."""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence as Seq

import torch

from seesaw_mc.config import DType, EngineConfig
from seesaw_mc.errors import ConfigError, InputError, ModelError
from seesaw_mc.model_spec import ModelArgs, ModelShape

# Keys are DType members, which equal their strings: a checkpoint's torch_dtype looks up too.
_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


def resolve_dtype(name: str, args: ModelArgs, on_cuda: bool) -> torch.dtype:
    if name != DType.AUTO:
        return _DTYPES[DType.parse(name, "dtype")]
    if not on_cuda:
        return torch.float32  # CPU matmuls are fastest and exact in fp32
    return _DTYPES.get(args.torch_dtype, torch.bfloat16)


def load_tokenizer(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ModelError(f"cannot load the tokenizer from {path!r}: {msg}") from None


def context_limit(args: ModelArgs, max_model_len: Optional[int]) -> int:
    """Longest prompt + output the model allows (or the user's max_model_len, if smaller)."""
    limit = args.max_position_embeddings
    if args.sliding_window:
        # Beyond the window the model attends differently; stay where we are exact.
        limit = min(limit, args.sliding_window)
    if max_model_len is not None and max_model_len > limit:
        raise ConfigError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
    return max_model_len or limit


def check_prompt(request_id, prompt_token_ids: Seq[int], vocab_size: int, context_len: int) -> List[int]:
    """The checks that need only the model's config: non-empty, ids in the vocabulary, fits the context."""
    ids = list(prompt_token_ids)
    if not ids:
        raise InputError(f"request {request_id!r}: empty prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise InputError(f"request {request_id!r}: prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= context_len:
        raise InputError(f"request {request_id!r}: prompt of {len(ids)} tokens does not fit the model's "
                         f"context of {context_len} tokens (one token must be left to generate)")
    return ids


def check_layouts(config: EngineConfig, args: ModelArgs) -> str:
    """Reject layouts the model or the launch cannot run, before any collective (so every
    rank fails alike, at once, with the same line). Returns the TP all-reduce backend."""
    for role, lay in (("prefill", config.prefill_layout), ("decode", config.decode_layout)):
        if args.num_heads % lay.tp or args.num_kv_heads % lay.tp:
            raise ConfigError(f"{role} layout {lay}: tp={lay.tp} must divide the model's {args.num_heads} attention "
                              f"heads and {args.num_kv_heads} KV heads")
        if lay.pp > args.num_layers:
            raise ConfigError(f"{role} layout {lay}: pp={lay.pp} exceeds the model's {args.num_layers} layers")
    from seesaw_mc.parallel.deepspeed_ops import choose_allreduce
    from seesaw_mc.parallel.megatron_adapter import HAS_CUDA, local_world_size

    cap = config.cache.device_capacity_bytes
    if cap is not None:
        shape = ModelShape.from_model_args(args, resolve_dtype(config.dtype, args, HAS_CUDA).itemsize)
        for role, lay in (("prefill", config.prefill_layout), ("decode", config.decode_layout)):
            need = shape.shard_bytes(lay)
            if need > cap * config.cache.device_memory_fraction:
                raise ConfigError(f"{role} layout {lay}: its weight shard ({need / 2**30:.2f} GiB per rank) does not "
                                  f"fit the emulated device ({cap / 2**30:.2f} GiB x {config.cache.device_memory_fraction}"
                                  f"); use more tensor or pipeline parallelism")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.world_size:
        raise ConfigError(f"layouts {config.prefill_layout} -> {config.decode_layout} need {config.world_size} ranks "
                          f"but {world} were launched")
    local = local_world_size(world)
    replica = config.prefill_layout.tp * config.prefill_layout.pp
    if config.prefill_layout != config.decode_layout and replica > local:
        raise ConfigError(f"switching layouts needs each DP replica ({replica} ranks) on one node "
                          f"({local} ranks per node here): KV moves through node-local shared memory")
    return choose_allreduce(config.allreduce, HAS_CUDA, world, local,
                            (config.prefill_layout.tp, config.decode_layout.tp))
