"""What a supported decoder looks like, in one place: its hyper-parameters (ModelArgs, read from
an HF config.json through the switch table in model_switches.py), the full shape of each
Megatron-named tensor and the HF tensors it is made of, and the byte formulas (weight shard per
layout, KV per token) that the engine, the planner and the checkpoints all size things with.

Torch-free on purpose: the planner and the CLI read shapes without loading torch.

Megatron layout (megatron-core local spec names):
  - linear_qkv rows are packed per query group: [q heads of the group..., k, v], head_dim rows
    each, so that TP splits by whole groups;
  - a gated linear_fc1 is [gate; up] (SwiGLU), else the one up-projection; linear_fc2 is down;
  - LayerNorm has a bias, RMSNorm none; q/k norms (Qwen3) are head_dim wide, shared by all heads;
  - learned absolute positions are `embedding.position_embeddings`, on the first stage.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import seesaw_mc.model_switches as switches
from seesaw_mc.errors import ConfigError, ModelError

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class ModelArgs:
    """One decoder's hyper-parameters. The structural fields are megatron-core's switches
    (model_switches.SWITCHES says which, and how HF and Megatron-LM spell them)."""

    architecture: str
    """The HF architecture the checkpoint is (or is exported as)."""
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    """Explicit (kv_channels): Qwen3's is not hidden/heads."""
    normalization: str = "RMSNorm"
    """"RMSNorm", or "LayerNorm" (with bias)."""
    norm_eps: float = 1e-6
    gated_mlp: bool = True
    """linear_fc1 is [gate; up] and the MLP is act(gate) * up (SwiGLU with silu)."""
    activation: str = "silu"
    """"silu", "gelu" (erf) or "gelu_tanh" (HF gelu_new, Megatron-LM --openai-gelu)."""
    linear_bias: bool = False
    """A bias on every linear layer (add_bias_linear)."""
    qkv_bias: bool = False
    """A bias on linear_qkv only (add_qkv_bias; Qwen2)."""
    qk_norm: bool = False
    """A per-head norm of q and k before RoPE (qk_layernorm; Qwen3)."""
    position_embedding: str = "rope"
    """"rope", or "learned_absolute" (added to the embedding on the first stage)."""
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    sliding_window: Optional[int] = None
    torch_dtype: str = "float32"
    eos_token_ids: Tuple[int, ...] = field(default_factory=tuple)

    @property
    def q_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.qkv_bias or self.linear_bias


# ---- HF config.json ---------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"model folder {os.path.dirname(path)!r} has no {os.path.basename(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e.__class__.__name__}: {e})") from None


def _args_from_hf_config(cfg: dict, model_dir: str) -> ModelArgs:
    where = f"{model_dir}/config.json"
    try:
        fields = switches.from_hf(cfg, where)
        sliding = cfg.get("sliding_window")
        if "use_sliding_window" in cfg and not cfg["use_sliding_window"]:  # Qwen2/Qwen3 carry a disabled window
            sliding = None
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            eos = _read_json(gen_path).get("eos_token_id", eos)
        eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return ModelArgs(**fields, sliding_window=int(sliding) if sliding else None,
                         torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
                         eos_token_ids=tuple(int(e) for e in eos_ids))
    except KeyError as e:
        raise ModelError(f"{where} lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where} has an invalid value ({e})") from None


def check_model_args(args: ModelArgs, where: str) -> ModelArgs:
    if args.num_heads % args.num_kv_heads:
        raise ModelError(f"{where}: num_attention_heads {args.num_heads} is not a multiple of num_key_value_heads "
                         f"{args.num_kv_heads}")
    if args.normalization not in ("RMSNorm", "LayerNorm"):
        raise ModelError(f"{where}: unsupported normalization {args.normalization!r} (RMSNorm or LayerNorm)")
    if args.position_embedding not in ("rope", "learned_absolute"):
        raise ModelError(f"{where}: unsupported position_embedding_type {args.position_embedding!r} "
                         f"(rope or learned_absolute)")
    return args


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
    return check_model_args(args, f"{model_dir}/config.json")


# ---- Megatron tensors -------------------------------------------------------------------------
def _norm(prefix: str, size: int, with_bias: bool) -> Dict[str, Shape]:
    out = {prefix + ".weight": (size,)}
    if with_bias:
        out[prefix + ".bias"] = (size,)
    return out


def _linear(prefix: str, rows: int, cols: int, with_bias: bool) -> Dict[str, Shape]:
    out = {prefix + ".weight": (rows, cols)}
    if with_bias:
        out[prefix + ".bias"] = (rows,)
    return out


def layer_tensor_shapes(m: "ModelShape") -> Dict[str, Shape]:
    """One decoder layer's Megatron tensors (the name after `decoder.layers.{i}.`) -> full shape."""
    ln_bias, d = m.norm == "LayerNorm", m.head_dim
    shapes = _norm("input_layernorm", m.hidden, ln_bias)
    shapes.update(_linear("self_attention.linear_qkv", (m.heads + 2 * m.kv_heads) * d, m.hidden,
                          m.qkv_bias or m.linear_bias))
    if m.qk_norm:
        shapes.update(_norm("self_attention.q_layernorm", d, ln_bias))
        shapes.update(_norm("self_attention.k_layernorm", d, ln_bias))
    shapes.update(_linear("self_attention.linear_proj", m.hidden, m.heads * d, m.linear_bias))
    shapes.update(_norm("pre_mlp_layernorm", m.hidden, ln_bias))
    shapes.update(_linear("mlp.linear_fc1", (2 if m.gated else 1) * m.ffn, m.hidden, m.linear_bias))
    shapes.update(_linear("mlp.linear_fc2", m.hidden, m.ffn, m.linear_bias))
    return shapes


def megatron_tensor_shapes(args: ModelArgs) -> Dict[str, Shape]:
    """Every Megatron-named tensor of the whole model -> its full (unsharded) shape, in the
    order the weights are stored."""
    m = ModelShape.from_model_args(args, 4)
    out = {"embedding.word_embeddings.weight": (args.vocab_size, args.hidden_size)}
    if m.positions:
        out["embedding.position_embeddings.weight"] = (m.positions, args.hidden_size)
    layer = layer_tensor_shapes(m)
    for i in range(args.num_layers):
        out.update({f"decoder.layers.{i}.{name}": shape for name, shape in layer.items()})
    out.update(_norm("decoder.final_layernorm", args.hidden_size, m.norm == "LayerNorm"))
    if not args.tie_word_embeddings:
        out["output_layer.weight"] = (args.vocab_size, args.hidden_size)
    return out


# ---- bytes ------------------------------------------------------------------------------------
def kv_bytes(num_layers: int, num_tokens: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of `num_tokens` tokens over `num_layers` layers and `kv_heads` heads (one rank's
    share: pass the heads that rank holds)."""
    return 2 * num_layers * num_tokens * kv_heads * head_dim * dtype_bytes


@dataclass(frozen=True)
class ModelShape:
    """A decoder's geometry, structure and serving dtype: what weight and KV bytes are computed
    from. The planner's paper models are ModelShapes with no checkpoint behind them."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    """0: hidden // heads."""
    tied: bool = False
    dtype_bytes: int = 2
    norm: str = "RMSNorm"
    gated: bool = True
    linear_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    positions: int = 0
    """Rows of a learned position embedding (0: RoPE)."""

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """Weights of one layer, biases and norms included."""
        return sum(math.prod(s) for s in layer_tensor_shapes(self).values())

    @property
    def _final_norm(self) -> int:
        return self.hidden * (2 if self.norm == "LayerNorm" else 1)

    @property
    def params(self) -> int:
        return (self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)
                + self.positions * self.hidden + self._final_norm)

    def kv_bytes_per_token(self, tp: int = 1, layers: Optional[int] = None) -> int:
        """K and V of one token on one TP rank of `layers` layers (KV heads replicate when tp > kv_heads)."""
        heads = max(1, self.kv_heads // tp) if tp <= self.kv_heads else 1
        return kv_bytes(self.layers if layers is None else layers, 1, heads, self.head_dim, self.dtype_bytes)

    def shard_bytes(self, lay) -> float:
        """Weights of the largest pipeline stage on one TP rank of layout `lay`: the embedding (and
        learned positions) on the first stage, the final norm and the LM head on the last (a copy of
        a tied embedding when pp > 1)."""
        first = (self.vocab + self.positions) * self.hidden
        last = self._final_norm + (self.vocab * self.hidden if (not self.tied or lay.pp > 1) else 0)
        ends = first + last if lay.pp == 1 else max(first, last)
        return (math.ceil(self.layers / lay.pp) * self.layer_params + ends) / lay.tp * self.dtype_bytes

    @classmethod
    def from_fields(cls, f: dict, name: str, dtype_bytes: int) -> "ModelShape":
        """ModelArgs' fields (a ModelArgs' __dict__, or model_switches.from_hf's answer) -> shape."""
        return cls(name=name, layers=f["num_layers"], hidden=f["hidden_size"], ffn=f["ffn_hidden_size"],
                   heads=f["num_heads"], kv_heads=f["num_kv_heads"], vocab=f["vocab_size"], head_dim=f["head_dim"],
                   tied=f["tie_word_embeddings"], dtype_bytes=dtype_bytes, norm=f["normalization"],
                   gated=f["gated_mlp"], linear_bias=f["linear_bias"], qkv_bias=f["qkv_bias"], qk_norm=f["qk_norm"],
                   positions=f["max_position_embeddings"] if f["position_embedding"] == "learned_absolute" else 0)

    @classmethod
    def from_model_args(cls, args: ModelArgs, dtype_bytes: int) -> "ModelShape":
        return cls.from_fields(vars(args), "model", dtype_bytes)

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model", dtype_bytes: Optional[int] = None) -> "ModelShape":
        """Any decoder's HF config; an architecture outside the switch table is read as
        Llama-shaped (nothing is refused: a plan is only arithmetic)."""
        try:
            f = switches.from_hf(cfg, name, strict=False)
        except KeyError as e:
            raise ConfigError(f"model config {name!r} lacks {e.args[0]!r}: not a decoder config we can read") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model config {name!r} has an invalid value ({e})") from None
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
        return cls.from_fields(f, name, dtype_bytes or (4 if "32" in dtype else 2))
