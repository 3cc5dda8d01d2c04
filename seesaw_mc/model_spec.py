"""What a supported decoder looks like, in one place: its hyper-parameters (ModelArgs, read from
an HF config.json), the full shape of each Megatron-named tensor and the HF tensors it is made
of, and the byte formulas (weight shard per layout, KV per token) that the engine, the planner
and the checkpoints all size things with.

Torch-free on purpose: the planner and the CLI read shapes without loading torch.

Megatron layout (megatron-core local spec names):
  - linear_qkv rows are packed per query group: [q heads of the group..., k, v], head_dim rows
    each, so that TP splits by whole groups;
  - linear_fc1 is [gate; up] (SwiGLU), linear_fc2 is down_proj.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from seesaw_mc.errors import ConfigError, ModelError

Shape = Tuple[int, ...]

SUPPORTED = {
    # architecture -> qkv bias
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: Optional[int]
    torch_dtype: str
    eos_token_ids: Tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


# ---- HF config.json ---------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"model folder {os.path.dirname(path)!r} has no {os.path.basename(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e.__class__.__name__}: {e})") from None


def hf_geometry(cfg: dict) -> dict:
    """The shape fields of an HF config, under ModelArgs' names. KeyError names a missing field;
    TypeError/ValueError a bad one (each caller words its own error)."""
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    return dict(vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, ffn_hidden_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"))


def _check_supported(cfg: dict, arch: str, where: str) -> None:
    """What the engine cannot run is refused here, with one line, rather than computed wrong."""
    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling")
    rope_type = (rope or rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"unsupported rope scaling {rope_type!r} in {where} (only default RoPE)")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelError(f"unsupported activation {act!r} in {where} (only SwiGLU/silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelError(f"unsupported attention_bias/mlp_bias in {where}")


def _args_from_hf_config(cfg: dict, model_dir: str) -> ModelArgs:
    where = f"{model_dir}/config.json"
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED:
        raise ModelError(f"unsupported architecture {arch!r} in {where} (supported: {', '.join(sorted(SUPPORTED))})")
    try:
        geometry = hf_geometry(cfg)
        _check_supported(cfg, arch, where)
        rope = cfg.get("rope_parameters") or {}
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            eos = _read_json(gen_path).get("eos_token_id", eos)
        eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return ModelArgs(
            architecture=arch, **geometry,
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=SUPPORTED[arch],
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )
    except KeyError as e:
        raise ModelError(f"{where} lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where} has an invalid value ({e})") from None


def load_model_args(model_dir: str) -> ModelArgs:
    """An HF model folder's config.json (+ generation_config.json's EOS) -> ModelArgs."""
    if not os.path.isdir(model_dir):
        raise ModelError(f"model folder {model_dir!r} does not exist")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from seesaw_mc.checkpoints.detect import detect_format

        fmt = detect_format(model_dir)
        if fmt is not None:
            raise ModelError(f"{model_dir} is a Megatron checkpoint ({fmt}); convert it first: seesaw-mc convert "
                             f"--input {model_dir} --output HF_DIR --tokenizer TOKENIZER_DIR")
    args = _args_from_hf_config(_read_json(os.path.join(model_dir, "config.json")), model_dir)
    if args.num_heads % args.num_kv_heads:
        raise ModelError(f"num_attention_heads {args.num_heads} is not a multiple of num_key_value_heads "
                         f"{args.num_kv_heads}")
    return args


# ---- Megatron tensors -------------------------------------------------------------------------
def layer_tensor_shapes(hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int,
                        qkv_bias: bool) -> Dict[str, Shape]:
    """One decoder layer's Megatron tensors (the name after `decoder.layers.{i}.`) -> full shape."""
    qkv = (heads + 2 * kv_heads) * head_dim
    shapes = {"input_layernorm.weight": (hidden,), "self_attention.linear_qkv.weight": (qkv, hidden)}
    if qkv_bias:
        shapes["self_attention.linear_qkv.bias"] = (qkv,)
    shapes.update({"self_attention.linear_proj.weight": (hidden, heads * head_dim),
                   "pre_mlp_layernorm.weight": (hidden,), "mlp.linear_fc1.weight": (2 * ffn, hidden),
                   "mlp.linear_fc2.weight": (hidden, ffn)})
    return shapes


def megatron_tensor_shapes(args: ModelArgs) -> Dict[str, Shape]:
    """Every Megatron-named tensor of the whole model -> its full (unsharded) shape, in the
    order the weights are stored."""
    out = {"embedding.word_embeddings.weight": (args.vocab_size, args.hidden_size)}
    layer = layer_tensor_shapes(args.hidden_size, args.ffn_hidden_size, args.num_heads, args.num_kv_heads,
                                args.head_dim, args.qkv_bias)
    for i in range(args.num_layers):
        out.update({f"decoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    out["decoder.final_layernorm.weight"] = (args.hidden_size,)
    if not args.tie_word_embeddings:
        out["output_layer.weight"] = (args.vocab_size, args.hidden_size)
    return out


_HF_GLOBAL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
              "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
_HF_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
             "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
             "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
             "mlp.linear_fc2.weight": "mlp.down_proj.weight"}


def hf_sources(name: str, shape: Shape, args: ModelArgs) -> List[Tuple[str, Shape]]:
    """The HF tensors (name, shape) that Megatron tensor `name` of full `shape` is made of, in
    packing order: q, k, v for linear_qkv; gate, up for linear_fc1; else the one same-shaped tensor."""
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
    if m is None:
        return [(_HF_GLOBAL[name], shape)]
    prefix, suffix = f"model.layers.{m.group(1)}.", m.group(2)
    rest = shape[1:]
    if suffix.startswith("self_attention.linear_qkv."):
        kind = suffix.rsplit(".", 1)[1]
        heads = (("q", args.num_heads), ("k", args.num_kv_heads), ("v", args.num_kv_heads))
        return [(f"{prefix}self_attn.{p}_proj.{kind}", (n * args.head_dim, *rest)) for p, n in heads]
    if suffix == "mlp.linear_fc1.weight":
        half = (shape[0] // 2, *rest)
        return [(prefix + "mlp.gate_proj.weight", half), (prefix + "mlp.up_proj.weight", half)]
    return [(prefix + _HF_LAYER[suffix], shape)]


# ---- bytes ------------------------------------------------------------------------------------
def kv_bytes(num_layers: int, num_tokens: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of `num_tokens` tokens over `num_layers` layers and `kv_heads` heads (one rank's
    share: pass the heads that rank holds)."""
    return 2 * num_layers * num_tokens * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class ModelShape:
    """A decoder's geometry and serving dtype: what weight and KV bytes are computed from. The
    planner's paper models are ModelShapes with no checkpoint behind them."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    tied: bool = False
    dtype_bytes: int = 2

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """Weights of one layer (QKV biases left out: they are noise next to the matrices)."""
        shapes = layer_tensor_shapes(self.hidden, self.ffn, self.heads, self.kv_heads, self.head_dim, False)
        return sum(math.prod(s) for s in shapes.values())

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def kv_bytes_per_token(self, tp: int = 1, layers: Optional[int] = None) -> int:
        """K and V of one token on one TP rank of `layers` layers (KV heads replicate when tp > kv_heads)."""
        heads = max(1, self.kv_heads // tp) if tp <= self.kv_heads else 1
        return kv_bytes(self.layers if layers is None else layers, 1, heads, self.head_dim, self.dtype_bytes)

    def shard_bytes(self, lay) -> float:
        """Weights of the largest pipeline stage on one TP rank of layout `lay` (embedding and LM
        head on their stages; both on the one stage when pp == 1 and they are not tied)."""
        ends = self.vocab * self.hidden * (1 if (self.tied or lay.pp > 1) else 2)
        return (math.ceil(self.layers / lay.pp) * self.layer_params + ends) / lay.tp * self.dtype_bytes

    @classmethod
    def from_model_args(cls, args: ModelArgs, dtype_bytes: int) -> "ModelShape":
        return cls(name="model", layers=args.num_layers, hidden=args.hidden_size, ffn=args.ffn_hidden_size,
                   heads=args.num_heads, kv_heads=args.num_kv_heads, vocab=args.vocab_size, head_dim=args.head_dim,
                   tied=args.tie_word_embeddings, dtype_bytes=dtype_bytes)

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model", dtype_bytes: Optional[int] = None) -> "ModelShape":
        """Any Llama-shaped HF config (the architecture is not checked: a plan is only arithmetic)."""
        try:
            g = hf_geometry(cfg)
        except KeyError as e:
            raise ConfigError(f"model config {name!r} lacks {e.args[0]!r}: not a Llama-family config") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config {name!r} has an invalid value ({e})") from None
        return cls(name=name, layers=g["num_layers"], hidden=g["hidden_size"], ffn=g["ffn_hidden_size"],
                   heads=g["num_heads"], kv_heads=g["num_kv_heads"], vocab=g["vocab_size"], head_dim=g["head_dim"],
                   tied=g["tie_word_embeddings"], dtype_bytes=dtype_bytes or (4 if "32" in g["torch_dtype"] else 2))
