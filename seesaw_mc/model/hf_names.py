"""HF tensor names: which HF tensors make each Megatron-named tensor, per naming scheme
(model_switches.Family.naming), and how they are stored. Torch-free; model/hf_import.py and
checkpoints/hf_export.py move the tensors both ways by it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Tuple

import seesaw_mc.model_switches as switches
from seesaw_mc.model_spec import ModelArgs, Shape

# HF module names per naming scheme (model_switches.Family.naming): Megatron module -> HF module(s).
# A tuple is packed into the one Megatron tensor in that order (q, k, v; gate, up).
_HF_GLOBAL = {
    "llama": {"embedding.word_embeddings": "model.embed_tokens", "decoder.final_layernorm": "model.norm",
              "output_layer": "lm_head"},
    "gpt2": {"embedding.word_embeddings": "transformer.wte", "embedding.position_embeddings": "transformer.wpe",
             "decoder.final_layernorm": "transformer.ln_f", "output_layer": "lm_head"},
}
_HF_LAYER = {
    "llama": ("model.layers.{}.", {
        "input_layernorm": "input_layernorm", "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj",
                                                                            "self_attn.v_proj"),
        "self_attention.q_layernorm": "self_attn.q_norm", "self_attention.k_layernorm": "self_attn.k_norm",
        "self_attention.linear_proj": "self_attn.o_proj", "pre_mlp_layernorm": "post_attention_layernorm",
        "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"), "mlp.linear_fc2": "mlp.down_proj"}),
    # GPT-2's linear layers are Conv1D: weights stored [in, out]; c_attn holds q, k, v fused.
    "gpt2": ("transformer.h.{}.", {
        "input_layernorm": "ln_1", "self_attention.linear_qkv": "attn.c_attn", "self_attention.linear_proj":
        "attn.c_proj", "pre_mlp_layernorm": "ln_2", "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}),
}


@dataclass(frozen=True)
class HFSources:
    """The HF tensors one Megatron tensor is made of: `parts` (name, shape in Megatron's
    [out, in] orientation), concatenated along dim 0 in this order; `transposed`: stored
    [in, out] on disk (GPT-2's Conv1D)."""

    parts: List[Tuple[str, Shape]]
    transposed: bool

    def disk_shape(self, i: int) -> Shape:
        shape = self.parts[i][1]
        return tuple(reversed(shape)) if self.transposed else shape


def hf_sources(name: str, shape: Shape, args: ModelArgs) -> HFSources:
    """Which HF tensors Megatron tensor `name` of full `shape` is made of."""
    naming = switches.ARCHITECTURES[args.architecture].naming
    module, kind = name.rsplit(".", 1)
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", module)
    if m is None:
        return HFSources([(f"{_HF_GLOBAL[naming][module]}.{kind}", shape)], False)
    prefix, table = _HF_LAYER[naming]
    hf = table[m.group(2)]
    transposed = naming == "gpt2" and kind == "weight" and len(shape) == 2
    if isinstance(hf, str):
        return HFSources([(f"{prefix.format(m.group(1))}{hf}.{kind}", shape)], transposed)
    rest = shape[1:]
    if m.group(2) == "self_attention.linear_qkv":
        rows = (args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.num_kv_heads * args.head_dim)
    else:
        rows = (shape[0] // 2, shape[0] // 2)
    return HFSources([(f"{prefix.format(m.group(1))}{h}.{kind}", (r, *rest)) for h, r in zip(hf, rows)], transposed)


def qkv_rows(args: ModelArgs) -> Tuple[int, int, int]:
    """Rows of q, k and v in HF order (all of q, then k, then v)."""
    d = args.head_dim
    return args.num_heads * d, args.num_kv_heads * d, args.num_kv_heads * d
