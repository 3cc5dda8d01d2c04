"""The one table of model switches. Each piece of the decoder has one row: its ModelArgs field,
megatron-core's switch for it (a TransformerConfig field, or a GPTModel argument), the
Megatron-LM training argument a checkpoint saves it under, and its key in HF config.json
(Llama-style configs and GPT-2's own names). A family is a setting of these switches plus
what its HF modeling code hard-wires (ARCHITECTURES). The model, the tensor table and the
checkpoint readers and writers all read this table; nothing forks per family.

Torch-free: the planner and the CLI read configs without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from seesaw_mc.errors import ModelError


@dataclass(frozen=True)
class Switch:
    field: str
    mcore: str
    """TransformerConfig field, or `GPTModel.<argument>`."""
    mlm: str
    """Megatron-LM argument saved with a checkpoint."""
    hf: str
    """HF key in Llama-style configs (Llama, Mistral, Qwen2, Qwen3); "" = hard-wired by the architecture."""
    hf_gpt2: str
    """HF key in GPT-2 configs; "" = hard-wired."""


SWITCHES: Tuple[Switch, ...] = (
    # ModelArgs field, megatron-core, Megatron-LM arg, HF (Llama-style), HF (GPT-2)
    Switch("vocab_size", "GPTModel.vocab_size", "padded_vocab_size", "vocab_size", "vocab_size"),
    Switch("hidden_size", "hidden_size", "hidden_size", "hidden_size", "n_embd"),
    Switch("ffn_hidden_size", "ffn_hidden_size", "ffn_hidden_size", "intermediate_size", "n_inner"),
    Switch("num_layers", "num_layers", "num_layers", "num_hidden_layers", "n_layer"),
    Switch("num_heads", "num_attention_heads", "num_attention_heads", "num_attention_heads", "n_head"),
    Switch("num_kv_heads", "num_query_groups", "num_query_groups", "num_key_value_heads", ""),
    Switch("head_dim", "kv_channels", "kv_channels", "head_dim", ""),
    Switch("normalization", "normalization", "normalization", "", ""),
    Switch("norm_eps", "layernorm_epsilon", "norm_epsilon", "rms_norm_eps", "layer_norm_epsilon"),
    Switch("gated_mlp", "gated_linear_unit", "swiglu", "", ""),
    Switch("activation", "activation_func", "openai_gelu", "hidden_act", "activation_function"),
    Switch("linear_bias", "add_bias_linear", "add_bias_linear", "attention_bias", ""),
    Switch("qkv_bias", "add_qkv_bias", "add_qkv_bias", "", ""),
    Switch("qk_norm", "qk_layernorm", "qk_layernorm", "", ""),
    Switch("position_embedding", "GPTModel.position_embedding_type", "position_embedding_type", "", ""),
    Switch("rope_theta", "GPTModel.rotary_base", "rotary_base", "rope_theta", ""),
    Switch("tie_word_embeddings", "GPTModel.share_embeddings_and_output_weights",
           "untie_embeddings_and_output_weights", "tie_word_embeddings", "tie_word_embeddings"),
    Switch("max_position_embeddings", "GPTModel.max_sequence_length", "max_position_embeddings",
           "max_position_embeddings", "n_positions"),
)
# Not one-to-one: Megatron-LM's `swiglu` sets gated_mlp and silu together, `openai_gelu` picks
# gelu_tanh over erf GELU, `untie_...` is tie_word_embeddings negated, num_query_groups counts only
# with `group_query_attention`; HF's Llama-style `attention_bias` pairs with `mlp_bias`, and
# `rope_theta` may sit in `rope_parameters`. from_megatron_lm / from_hf handle those.

# ModelArgs.activation -> its HF name on export; HF names -> ModelArgs.activation on import.
# gelu_tanh is GELU's tanh approximation (HF `gelu_new`, Megatron-LM `--openai-gelu`).
ACTIVATION_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh"}

# Megatron-LM's argparse defaults: what a saved args Namespace that lacks an argument means.
MLM_DEFAULTS = {"normalization": "LayerNorm", "norm_epsilon": 1e-5, "swiglu": False, "openai_gelu": False,
                "add_bias_linear": True, "add_qkv_bias": False, "qk_layernorm": False,
                "position_embedding_type": "learned_absolute", "rotary_base": 10000,
                "untie_embeddings_and_output_weights": False}

_ACTIVATION = next(s for s in SWITCHES if s.field == "activation")
_Refusal = Tuple[str, Callable[[object, dict], bool], str]


@dataclass(frozen=True)
class Family:
    model_type: str
    naming: str
    """"llama" or "gpt2": which HF key column of SWITCHES its config.json uses."""
    fixed: Dict[str, object]
    """What the HF modeling code hard-wires (and what a structure must have to be exported as it)."""
    defaults: Dict[str, object] = field(default_factory=dict)
    """The config class's defaults, for keys a config.json may leave out."""
    refuse: Tuple[_Refusal, ...] = ()
    """(HF key, is_unsupported(value, config), why): settings megatron-core has no switch for."""
    export: bool = True
    """Chosen when a Megatron checkpoint's structure is converted to HF."""


_LLAMA_STYLE = dict(normalization="RMSNorm", gated_mlp=True, position_embedding="rope", qk_norm=False, qkv_bias=False)
_LLAMA_DEFAULTS = dict(norm_eps=1e-6, activation="silu", tie_word_embeddings=False, max_position_embeddings=2048,
                       rope_theta=10000.0, linear_bias=False)
ARCHITECTURES: Dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", "llama", _LLAMA_STYLE, _LLAMA_DEFAULTS, refuse=(
        ("mlp_bias", lambda v, c: bool(v) != bool(c.get("attention_bias")),
         "differs from attention_bias (megatron-core's add_bias_linear sets both)"),)),
    "MistralForCausalLM": Family("mistral", "llama", _LLAMA_STYLE, _LLAMA_DEFAULTS, export=False),
    "Qwen2ForCausalLM": Family("qwen2", "llama", {**_LLAMA_STYLE, "qkv_bias": True, "linear_bias": False},
                               _LLAMA_DEFAULTS),
    "Qwen3ForCausalLM": Family("qwen3", "llama", {**_LLAMA_STYLE, "qk_norm": True, "linear_bias": False},
                               _LLAMA_DEFAULTS, refuse=(
        ("attention_bias", lambda v, c: bool(v), "(a bias on q/k/v/o without one on the MLP has no megatron-core "
                                                 "switch)"),)),
    "GPT2LMHeadModel": Family(
        "gpt2", "gpt2",
        dict(normalization="LayerNorm", gated_mlp=False, position_embedding="learned_absolute", linear_bias=True,
             qkv_bias=False, qk_norm=False),
        dict(norm_eps=1e-5, activation="gelu_new", tie_word_embeddings=True, max_position_embeddings=1024),
        refuse=(("scale_attn_by_inverse_layer_idx", lambda v, c: bool(v), "(attention scaled per layer)"),
                ("scale_attn_weights", lambda v, c: v is False, "(unscaled attention)"),
                ("add_cross_attention", lambda v, c: bool(v), "(cross-attention)"))),
}


def _hf_key(fam: Family, sw: Switch) -> str:
    return sw.hf_gpt2 if fam.naming == "gpt2" else sw.hf


def _check_rope(cfg: dict, where: str) -> None:
    # transformers 5 writes the scaling into rope_parameters, older configs into rope_scaling.
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in (None, "default"):
            raise ModelError(f"unsupported {key} type {kind!r} in {where} (only default RoPE)")


def from_hf(cfg: dict, where: str, strict: bool = True) -> dict:
    """An HF config.json -> ModelArgs' fields (all but the EOS ids, sliding window and dtype).
    One-line ModelError naming the field for what cannot run; KeyError/TypeError/ValueError for
    missing or bad values (the caller words them). strict=False (the planner): an unknown
    architecture reads as Llama-style and nothing is refused."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        if strict:
            raise ModelError(f"unsupported architecture {arch!r} in {where} "
                             f"(supported: {', '.join(sorted(ARCHITECTURES))})")
        arch = "GPT2LMHeadModel" if "n_embd" in cfg else "LlamaForCausalLM"
    fam = ARCHITECTURES[arch]
    if strict:
        _check_rope(cfg, where)
        for key, bad, why in fam.refuse:
            if key in cfg and bad(cfg[key], cfg):
                raise ModelError(f"unsupported {key}={cfg[key]!r} in {where} {why}")
    out = dict(fam.defaults)
    for sw in SWITCHES:
        key = _hf_key(fam, sw)
        if key and cfg.get(key) is not None:
            out[sw.field] = cfg[key]
    if fam.naming == "llama" and "rope_theta" in (cfg.get("rope_parameters") or {}):
        out["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    out.update(fam.fixed, architecture=arch)
    act = out["activation"]
    if act not in HF_ACTIVATIONS and strict:
        raise ModelError(f"unsupported {_hf_key(fam, _ACTIVATION)} {act!r} in {where} "
                         f"(supported: {', '.join(sorted(HF_ACTIVATIONS))})")
    out["activation"] = HF_ACTIVATIONS.get(act, "silu")
    for name in ("hidden_size", "num_layers", "num_heads", "vocab_size"):
        if name not in out:
            raise KeyError(_hf_key(fam, next(s for s in SWITCHES if s.field == name)))
    return _derive(out)


def _derive(out: dict) -> dict:
    """The geometry left implicit: MHA when no KV heads are given, hidden/heads per head, a 4x MLP."""
    hidden, heads = int(out["hidden_size"]), int(out["num_heads"])
    if not out.get("head_dim") and hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of num_attention_heads {heads}, and no head_dim")
    out["num_kv_heads"] = int(out.get("num_kv_heads") or heads)
    out["head_dim"] = int(out.get("head_dim") or hidden // heads)
    out["ffn_hidden_size"] = int(out.get("ffn_hidden_size") or 4 * hidden)
    for k in ("vocab_size", "num_layers", "max_position_embeddings"):
        out[k] = int(out[k])
    out.update(hidden_size=hidden, num_heads=heads, norm_eps=float(out["norm_eps"]),
               rope_theta=float(out.get("rope_theta") or 10000.0))
    for k in ("linear_bias", "qkv_bias", "qk_norm", "gated_mlp", "tie_word_embeddings"):
        out[k] = bool(out.get(k))
    out["qkv_bias"] = out["qkv_bias"] and not out["linear_bias"]  # add_bias_linear covers linear_qkv too
    return out


def to_hf(args) -> Tuple[str, dict]:
    """ModelArgs -> (model_type, config.json fields) for args.architecture."""
    fam = ARCHITECTURES[args.architecture]
    kw = {}
    for sw in SWITCHES:
        key = _hf_key(fam, sw)
        if key:
            kw[key] = getattr(args, sw.field)
    kw[_hf_key(fam, _ACTIVATION)] = ACTIVATION_TO_HF[args.activation]
    if args.architecture == "LlamaForCausalLM":
        kw["mlp_bias"] = args.linear_bias
    if fam.model_type == "qwen2":
        kw.pop("attention_bias", None)  # Qwen2 hard-wires its biases
    return fam.model_type, kw


def hf_architecture(fields: dict, where: str) -> str:
    """The HF architecture that expresses a structure (a Megatron checkpoint's), or a one-line
    ModelError naming the Megatron-LM arguments in which the closest one differs."""
    gpt2_heads = fields["num_kv_heads"] == fields["num_heads"] and \
        fields["head_dim"] * fields["num_heads"] == fields["hidden_size"]
    closest = None
    for arch, fam in ARCHITECTURES.items():
        if not fam.export:
            continue
        wrong = [k for k, v in fam.fixed.items() if fields[k] != v]
        if arch == "GPT2LMHeadModel" and not gpt2_heads:
            wrong.append("num_query_groups/kv_channels")
        if not wrong:
            return arch
        if closest is None or len(wrong) < len(closest[1]):
            closest = (arch, wrong)
    arch, wrong = closest
    mlm = {s.field: s.mlm for s in SWITCHES}
    what = ", ".join(f"{mlm.get(k, k)}={fields[k]!r}" if k in fields else k for k in wrong)
    raise ModelError(f"{where}: unsupported model: no HF architecture has this structure (closest: {arch}, "
                     f"which differs in {what})")


def mcore_switches(args) -> Tuple[dict, dict]:
    """ModelArgs -> (TransformerConfig fields, GPTModel arguments); `activation_func` is left as
    ModelArgs' name (the caller, which may import torch, resolves it)."""
    tc, gpt = {}, {}
    for sw in SWITCHES:
        value = getattr(args, sw.field)
        if sw.mcore.startswith("GPTModel."):
            gpt[sw.mcore.split(".", 1)[1]] = value
        else:
            tc[sw.mcore] = value
    return tc, gpt


def from_megatron_lm(a: dict) -> dict:
    """Saved Megatron-LM args -> ModelArgs' fields but `architecture` (hf_architecture picks it).
    KeyError names a missing argument."""
    def get(key):
        return a[key] if a.get(key) is not None else MLM_DEFAULTS.get(key)

    out = {sw.field: get(sw.mlm) for sw in SWITCHES}
    out["vocab_size"] = a.get("padded_vocab_size") or a["vocab_size"]
    for k in ("hidden_size", "num_layers", "num_heads"):
        if out[k] is None:
            raise KeyError(next(s.mlm for s in SWITCHES if s.field == k))
    if not a.get("group_query_attention", False):
        out["num_kv_heads"] = None
    out["gated_mlp"] = bool(get("swiglu"))
    out["activation"] = "silu" if out["gated_mlp"] else ("gelu_tanh" if get("openai_gelu") else "gelu")
    out["tie_word_embeddings"] = not get("untie_embeddings_and_output_weights")
    if a.get("use_rotary_position_embeddings"):  # the flag before position_embedding_type existed
        out["position_embedding"] = "rope"
    out["max_position_embeddings"] = out["max_position_embeddings"] or a.get("seq_length") or 2048
    return _derive(out)


def to_megatron_lm(args) -> dict:
    """ModelArgs -> the Megatron-LM training arguments that describe the same model."""
    out = {sw.mlm: getattr(args, sw.field) for sw in SWITCHES}
    if args.gated_mlp and args.activation != "silu":
        raise ModelError(f"a gated MLP with activation {args.activation!r} has no Megatron-LM flag (only --swiglu)")
    out.update(swiglu=args.gated_mlp, openai_gelu=args.activation == "gelu_tanh",
               untie_embeddings_and_output_weights=not args.tie_word_embeddings, vocab_size=args.vocab_size,
               group_query_attention=args.num_kv_heads != args.num_heads, seq_length=args.max_position_embeddings,
               rotary_percent=1.0, num_experts=None)
    return out

