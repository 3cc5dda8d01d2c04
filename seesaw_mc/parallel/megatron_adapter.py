"""The only module that knows megatron-core internals and its CUDA assumptions.

Everything else asks this module for: a TransformerConfig suited to the device, the rotary
table, RoPE application, process groups, and the distributed start-up. On CPU the
adaptations (cpu initialisation, no fusions, no `torch.cuda.current_device()` calls) are
applied here and only here.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

# megatron-core warns about optional extras (TE, apex, nvidia-modelopt) at import time.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

HAS_CUDA = torch.cuda.is_available()


def default_device() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def transformer_config(args, params_dtype: torch.dtype, tp_size: int = 1, pp_size: int = 1) -> TransformerConfig:
    """A megatron-core TransformerConfig for a Llama-family decoder (inference only)."""
    on_cpu = not HAS_CUDA
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        rotary_interleaved=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        # Inference: weights come from a checkpoint, never from Megatron's initialisers.
        perform_initialization=False,
        use_cpu_initialization=on_cpu,
        # Fusions need CUDA kernels (TE/apex/triton); on CPU they are turned off.
        bias_activation_fusion=False if on_cpu else False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def rotary_table(args, max_len: int, device: torch.device) -> torch.Tensor:
    """RoPE angles for positions [0, max_len): shape [max_len, 1, 1, head_dim] (megatron layout)."""
    rope = RotaryEmbedding(kv_channels=args.head_dim, rotary_percent=1.0, rotary_interleaved=False,
                           rotary_base=args.rope_theta, use_cpu_initialization=True)
    # NOTE: RotaryEmbedding.get_emb/forward move inv_freq to torch.cuda.current_device();
    # building the table from the non-repeated frequencies avoids that on CPU.
    freqs = rope.get_freqs_non_repeated(max_len)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    return emb.to(device)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate t [tokens, 1, heads, head_dim] by per-token angles freqs [tokens, 1, 1, head_dim]."""
    # apply_rotary_pos_emb() asks parallel_state for a context-parallel group even when
    # none is used; the bshd kernel it dispatches to is called directly.
    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)


def init_distributed(backend: Optional[str] = None) -> None:
    """Start torch.distributed from the launcher's environment, or as a 1-rank group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = backend or ("nccl" if HAS_CUDA else "gloo")
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> None:
    """Start torch.distributed if needed and build megatron-core's groups for (tp, pp)."""
    init_distributed()
    if not parallel_state.model_parallel_is_initialized():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def tp_group():
    """megatron-core's current tensor-parallel group (megatron layers need one, even of size 1)."""
    return parallel_state.get_tensor_model_parallel_group()
