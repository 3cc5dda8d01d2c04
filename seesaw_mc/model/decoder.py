"""The decoder of every supported family (Llama, Mistral, Qwen2, Qwen3, GPT-2 and Megatron's
classic GPT) on megatron-core layers. Its pieces follow ModelArgs' switches (model_switches.py):
RMSNorm or LayerNorm, a gated or plain MLP and its activation, linear biases, q/k norms, RoPE
or learned absolute positions, tied or untied output; there is no class per family.

The module tree carries megatron-core's names (`embedding.word_embeddings`,
`decoder.layers.N.self_attention.linear_qkv`, ..., `output_layer`), so Megatron checkpoints
and `sharded_state_dict` map onto it. A model instance is one pipeline stage of one TP
layout: it holds layers [layer_start, layer_end) and TP shards sized for its tp_group.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import nn

from seesaw_mc.model import fused_ops
from seesaw_mc.model.attention import get_attn_metadata, paged_attention
from seesaw_mc.model.kernels import TORCH_KERNELS, KernelChoice, rmsnorm
from seesaw_mc.model.sharding import padded_vocab_size
from seesaw_mc.model_spec import ModelArgs
from seesaw_mc.parallel import megatron_adapter as mc

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.torch_norm import WrappedTorchNorm


def _no_init(_w):
    return None


class SelfAttention(MegatronModule):
    def __init__(self, config, args: ModelArgs, tp_group):
        super().__init__(config)
        tp = tp_group.size() if tp_group is not None else 1
        d = args.head_dim
        self.num_heads = args.num_heads // tp
        self.num_kv_heads = args.num_kv_heads // tp
        self.head_dim = d
        self.scale = 1.0 / math.sqrt(d)
        self.use_rope = args.position_embedding == "rope"
        # disable_grad_reduce (every column-parallel layer here): megatron-core's input copy-to-region is
        # an identity forward whose job is the gradients' all-reduce, and inference has none; its
        # autograd Function costs about 14 us a call (measured).
        self.linear_qkv = ColumnParallelLinear(
            args.hidden_size, (args.num_heads + 2 * args.num_kv_heads) * d, config=config, init_method=_no_init,
            bias=args.has_qkv_bias, gather_output=False, tp_group=tp_group, disable_grad_reduce=True)
        # Qwen3: one norm over each head's head_dim, shared by all heads (megatron-core's qk_layernorm).
        self.q_layernorm = WrappedTorchNorm(config, d, eps=args.norm_eps) if args.qk_norm else None
        self.k_layernorm = WrappedTorchNorm(config, d, eps=args.norm_eps) if args.qk_norm else None
        # Row-parallel bias: added once, after the all-reduce (megatron-core's RowParallelLinear).
        self.linear_proj = RowParallelLinear(
            args.num_heads * d, args.hidden_size, config=config, init_method=_no_init, bias=args.linear_bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
        self.kv_cache: Tuple[torch.Tensor, torch.Tensor] = (None, None)

    def forward(self, x, rope):
        """rope: megatron's angle rows [T, 1, 1, D], or fused_ops.RopeRows for the fused op."""
        t = x.shape[0]
        qkv, _ = self.linear_qkv(x)
        # Per query group: [q x q_per_group, k, v], each head_dim wide.
        qkv = qkv.view(t, self.num_kv_heads, self.num_heads // self.num_kv_heads + 2, self.head_dim)
        fused_rope = isinstance(rope, fused_ops.RopeRows)
        if fused_rope and self.q_layernorm is None:
            fused_ops.rotary_(qkv[:, :, :-1], rope)  # q and k in place, before they are copied out
        q = qkv[:, :, :-2].reshape(t, self.num_heads, self.head_dim)
        k = qkv[:, :, -2:-1].reshape(t, self.num_kv_heads, self.head_dim)
        v = qkv[:, :, -1].contiguous()
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
            if fused_rope:
                fused_ops.rotary_(q[:, None], rope)
                fused_ops.rotary_(k[:, None], rope)
        if self.use_rope and not fused_rope:
            q = mc.apply_rope(q.view(t, 1, self.num_heads, self.head_dim), rope).view(t, self.num_heads, self.head_dim)
            k = mc.apply_rope(k.view(t, 1, self.num_kv_heads, self.head_dim), rope).view(
                t, self.num_kv_heads, self.head_dim)
        o = paged_attention(q, k, v, *self.kv_cache, scale=self.scale)
        out, _ = self.linear_proj(o.reshape(t, self.num_heads * self.head_dim))
        return out


class MLP(MegatronModule):
    """SwiGLU-style (gated: linear_fc1 is [gate; up]) or plain (GELU, with biases: GPT-2)."""

    def __init__(self, config, args: ModelArgs, tp_group, fc1_pairs: int = 1):
        super().__init__(config)
        tp = tp_group.size() if tp_group is not None else 1
        self.gated = args.gated_mlp
        # linear_fc1's local rows are `pairs` interleaved [gate_c; up_c] chunks (sharding.interleave_fc1).
        self.pairs = max(1, fc1_pairs // tp)
        self.act = config.activation_func
        self.fusable = self.gated and self.act is torch.nn.functional.silu
        width = (2 if self.gated else 1) * args.ffn_hidden_size
        self.linear_fc1 = ColumnParallelLinear(args.hidden_size, width, config=config, init_method=_no_init,
                                               bias=args.linear_bias, gather_output=False, tp_group=tp_group,
                                               disable_grad_reduce=True)
        self.linear_fc2 = RowParallelLinear(args.ffn_hidden_size, args.hidden_size, config=config,
                                            init_method=_no_init, bias=args.linear_bias, input_is_parallel=True,
                                            skip_bias_add=False, tp_group=tp_group)

    def forward(self, x, fused: bool = False):
        out, _ = self.linear_fc2(self.up(x, fused))
        return out

    def up(self, x, fused: bool = False):
        """linear_fc1 and the activation: linear_fc2's input."""
        h, _ = self.linear_fc1(x)
        if fused and self.fusable:
            return fused_ops.silu_and_mul(h, self.pairs)
        if not self.gated:
            return self.act(h)
        if self.pairs == 1:
            gate, up = h.chunk(2, dim=-1)
        else:
            h = h.view(h.shape[0], self.pairs, 2, -1)
            gate, up = h[:, :, 0].reshape(h.shape[0], -1), h[:, :, 1].reshape(h.shape[0], -1)
        return self.act(gate) * up


class DecoderLayer(MegatronModule):
    def __init__(self, config, args: ModelArgs, tp_group, layer_number: int, fc1_pairs: int = 1):
        super().__init__(config)
        self.layer_number = layer_number
        self.input_layernorm = WrappedTorchNorm(config, args.hidden_size, eps=args.norm_eps)
        self.self_attention = SelfAttention(config, args, tp_group)
        self.pre_mlp_layernorm = WrappedTorchNorm(config, args.hidden_size, eps=args.norm_eps)
        self.mlp = MLP(config, args, tp_group, fc1_pairs)

    kernels: KernelChoice = TORCH_KERNELS  # set by CausalLM

    def forward(self, x, rope):
        x = x + self.self_attention(rmsnorm(self.kernels, self.input_layernorm, x), rope)
        return x + self.mlp(rmsnorm(self.kernels, self.pre_mlp_layernorm, x))

    def forward_fused(self, residual, delta, rope):
        """The fused ops' form: the residual stream is updated in place and the layer returns
        its MLP output, which the next layer adds together with its norm (delta None: first layer)."""
        h = fused_ops.add_rms_norm(delta, residual, self.input_layernorm)
        h = fused_ops.add_rms_norm(self.self_attention(h, rope), residual, self.pre_mlp_layernorm)
        return self.mlp(h, fused=True)


class Decoder(MegatronModule):
    def __init__(self, config, args: ModelArgs, tp_group, layer_start: int, layer_end: int, post_process: bool,
                 fc1_pairs: int = 1):
        super().__init__(config)
        self.layers = nn.ModuleList(
            DecoderLayer(config, args, tp_group, layer_number=i + 1, fc1_pairs=fc1_pairs)
            for i in range(layer_start, layer_end))
        self.final_layernorm = (WrappedTorchNorm(config, args.hidden_size, eps=args.norm_eps)
                                if post_process else None)


class CausalLM(MegatronModule):
    """One pipeline stage of a decoder of any supported family in one TP layout."""

    def __init__(self, args: ModelArgs, params_dtype: torch.dtype, device: torch.device, max_len: int,
                 tp_group=None, layer_start: int = 0, layer_end: Optional[int] = None, fc1_pairs: int = 1,
                 kernels: Optional[KernelChoice] = None):
        tp = tp_group.size() if tp_group is not None else 1
        config = mc.transformer_config(args, params_dtype, tp_size=tp)
        super().__init__(config)
        self.args = args
        self.tp_rank = tp_group.rank() if tp_group is not None else 0
        self.tp_size = tp
        self.tp_group = tp_group
        self.layer_start = layer_start
        self.layer_end = args.num_layers if layer_end is None else layer_end
        self.pre_process = layer_start == 0
        self.post_process = self.layer_end == args.num_layers
        self.vocab_size = args.vocab_size
        vocab = padded_vocab_size(args.vocab_size, tp)
        if self.pre_process:
            # Word embeddings (vocab-parallel), plus learned absolute positions (replicated) when the
            # model has them: only the first stage holds either, as in megatron-core.
            self.embedding = LanguageModelEmbedding(config, vocab, args.max_position_embeddings,
                                                    position_embedding_type=args.position_embedding,
                                                    tp_group=tp_group)
        self.fc1_pairs = fc1_pairs
        self.decoder = Decoder(config, args, tp_group, layer_start, self.layer_end, self.post_process, fc1_pairs)
        # The fused-norm choice is an RMSNorm kernel: LayerNorm models run torch's norm.
        self.kernels = (kernels or TORCH_KERNELS) if args.normalization == "RMSNorm" else TORCH_KERNELS
        for layer in self.decoder.layers:
            layer.kernels = self.kernels
        # Tied embeddings: the output layer reuses the embedding, unless this last stage has
        # none (pipeline parallel), in which case it holds its own copy, as Megatron does.
        self.shares_embedding = args.tie_word_embeddings and self.pre_process
        if self.post_process:
            self.output_layer = ColumnParallelLinear(
                args.hidden_size, vocab, config=config, init_method=_no_init, bias=False, gather_output=True,
                skip_weight_param_allocation=self.shares_embedding, tp_group=tp_group, disable_grad_reduce=True)
        self.device = device
        rope = mc.rotary_table(args, max_len, device) if args.position_embedding == "rope" else None
        self.register_buffer("rope", rope, persistent=False)
        self.rope_cos_sin = fused_ops.rope_tables(rope) if rope is not None and self.kernels.fused else None
        self.eval()  # no dropout

    @torch.inference_mode()
    def forward(self, input_ids: Optional[torch.Tensor], hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [T] on the first stage, else the previous stage's hidden [T, h]."""
        meta = get_attn_metadata()
        if self.pre_process:  # megatron-core's embedding takes [b, s] and returns [s, b, h]
            x = self.embedding(input_ids[None], meta.positions[None])[:, 0]
        else:
            x = hidden
        rope = self.rope_rows(meta.positions)
        if self.kernels.fused:
            return self._forward_fused(x, rope)
        for layer in self.decoder.layers:
            x = layer(x, rope)
        return x

    def _forward_fused(self, x: torch.Tensor, rope) -> torch.Tensor:
        # Updated in place: never the caller's tensor.
        residual, delta = x.clone(memory_format=torch.contiguous_format), None
        for layer in self.decoder.layers:
            delta = layer.forward_fused(residual, delta, rope)
        return residual if delta is None else residual + delta

    def rope_rows(self, positions: torch.Tensor):
        """The rotary angles of `positions` in the form the layers take (fused or megatron's)."""
        if self.kernels.fused:
            return fused_ops.rope_rows(*self.rope_cos_sin, positions) if self.rope_cos_sin is not None else None
        return self.rope[positions] if self.rope is not None else None

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + output layer on the selected rows -> fp32 logits [N, vocab]."""
        return self._lm_head(hidden, gather=True)[:, : self.vocab_size].float()

    def _lm_head(self, hidden: torch.Tensor, gather: bool) -> torch.Tensor:
        """Final norm + output layer: the whole (padded) vocab, or this TP rank's shard of it."""
        x = rmsnorm(self.kernels, self.decoder.final_layernorm, hidden)
        weight = self.embedding.word_embeddings.weight if self.shares_embedding else None
        logits, _ = self.output_layer(x, weight=weight, runtime_gather_output=gather)
        return logits

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """compute_logits(hidden).argmax(-1) [N], without gathering the logits across TP ranks:
        each rank takes the max of its vocab shard, and the ranks swap (value, index) pairs, N x
        16 bytes instead of N x vocab x 4 (a TP2 decode step of 16 rows over 418 Mbit/s: 5 ms of
        about 100). The same token: the shards hold the very numbers the gather would, and a tie
        goes to the lowest index, as torch.argmax does."""
        local = self._lm_head(hidden, gather=False)
        start = self.tp_rank * local.shape[-1]
        mine = local[:, : max(0, min(local.shape[-1], self.vocab_size - start))].float()  # no padded rows
        if mine.shape[-1]:
            best, idx = mine.max(dim=-1)  # the first maximum, as argmax
        else:
            best = torch.full((local.shape[0],), -torch.inf, device=local.device)
            idx = torch.zeros(local.shape[0], dtype=torch.long, device=local.device)
        if self.tp_size == 1:
            return idx
        import torch.distributed as dist

        pair = torch.stack([best.double(), (idx + start).double()], dim=-1)  # exact: fp32 and int < 2^53
        parts = [torch.empty_like(pair) for _ in range(self.tp_size)]
        dist.all_gather(parts, pair, group=self.tp_group)
        return first_max_of_shards(torch.stack(parts))


def first_max_of_shards(pairs: torch.Tensor) -> torch.Tensor:
    """pairs [shards, N, 2]: each vocab shard's (max, its index) per row, shards in vocab order ->
    the index of the row's maximum [N]; ties go to the lowest shard, whose indices are lowest."""
    winner = pairs[..., 0].argmax(dim=0)
    return pairs[..., 1].gather(0, winner[None]).squeeze(0).long()
