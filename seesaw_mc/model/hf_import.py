"""HF checkpoint import: config.json -> ModelArgs, safetensors -> Megatron-named full tensors.

Megatron layout (megatron-core local spec names):
  - linear_qkv rows are packed per query group: [q heads of the group..., k, v], head_dim rows
    each, so that TP splits by whole groups;
  - linear_fc1 is [gate; up] (SwiGLU), linear_fc2 is down_proj.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Tuple

import torch

from seesaw_mc.errors import ModelError

SUPPORTED = {
    # architecture -> (qkv bias, family)
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


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ModelError(f"model folder {os.path.dirname(path)!r} has no {os.path.basename(path)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({e.__class__.__name__}: {e})") from None


def load_model_args(model_dir: str) -> ModelArgs:
    if not os.path.isdir(model_dir):
        raise ModelError(f"model folder {model_dir!r} does not exist")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from seesaw_mc.checkpoints.megatron import detect_format

        fmt = detect_format(model_dir)
        if fmt is not None:
            raise ModelError(f"{model_dir} is a Megatron checkpoint ({fmt}); convert it first: seesaw-mc convert "
                             f"--input {model_dir} --output HF_DIR --tokenizer TOKENIZER_DIR")
    cfg = _read_json(os.path.join(model_dir, "config.json"))
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED:
        raise ModelError(
            f"unsupported architecture {arch!r} in {model_dir}/config.json "
            f"(supported: {', '.join(sorted(SUPPORTED))})"
        )
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        rope = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling")
        rope_type = (rope or rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if rope_type not in (None, "default"):
            raise ModelError(f"unsupported rope scaling {rope_type!r} in {model_dir}/config.json (only default RoPE)")
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelError(f"unsupported activation {act!r} in {model_dir}/config.json (only SwiGLU/silu)")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ModelError(f"unsupported attention_bias/mlp_bias in {model_dir}/config.json")
        sliding = cfg.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.exists(gen_path):
            eos = _read_json(gen_path).get("eos_token_id", eos)
        eos_ids = tuple(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        args = ModelArgs(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            ffn_hidden_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=rope_theta,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            qkv_bias=SUPPORTED[arch],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            sliding_window=int(sliding) if sliding else None,
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )
    except KeyError as e:
        raise ModelError(f"{model_dir}/config.json lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{model_dir}/config.json has an invalid value ({e})") from None
    if args.num_heads % args.num_kv_heads:
        raise ModelError(f"num_attention_heads {args.num_heads} is not a multiple of num_key_value_heads {args.num_kv_heads}")
    return args


class SafetensorsReader:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
        if not files:
            raise ModelError(f"model folder {model_dir!r} has no *.safetensors weights")
        self._where: Dict[str, str] = {}
        self._handles = {}
        for name in files:
            path = os.path.join(model_dir, name)
            try:
                h = safe_open(path, framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types
                raise ModelError(f"cannot read {path}: corrupt or truncated safetensors file ({e})") from None
            self._handles[path] = h
            for k in keys:
                self._where[k] = path

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelError(f"checkpoint is missing tensor {name!r}")
        path = self._where[name]
        try:
            return self._handles[path].get_tensor(name)
        except Exception as e:
            raise ModelError(f"cannot read tensor {name!r} from {path}: {e}") from None


def _expect(t: torch.Tensor, shape, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ModelError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
    return t


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """HF q/k/v (rows = heads x head_dim) -> Megatron linear_qkv rows packed per query group."""
    g, qpg, d = args.num_kv_heads, args.q_per_group, args.head_dim
    rest = q.shape[1:]
    q = q.reshape(g, qpg * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (qpg + 2) * d, *rest)


def iter_megatron_tensors(model_dir: str, args: ModelArgs) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (megatron_name, full tensor) for the whole model, shapes checked against the config."""
    r = SafetensorsReader(model_dir)
    h, f, d = args.hidden_size, args.ffn_hidden_size, args.head_dim
    qd, kd = args.num_heads * d, args.num_kv_heads * d
    yield "embedding.word_embeddings.weight", _expect(r.get("model.embed_tokens.weight"), (args.vocab_size, h), "model.embed_tokens.weight")
    for i in range(args.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."

        def get(name, shape):
            return _expect(r.get(src + name), shape, src + name)

        yield dst + "input_layernorm.weight", get("input_layernorm.weight", (h,))
        yield dst + "self_attention.linear_qkv.weight", pack_qkv(
            get("self_attn.q_proj.weight", (qd, h)), get("self_attn.k_proj.weight", (kd, h)),
            get("self_attn.v_proj.weight", (kd, h)), args)
        if args.qkv_bias:
            yield dst + "self_attention.linear_qkv.bias", pack_qkv(
                get("self_attn.q_proj.bias", (qd,)), get("self_attn.k_proj.bias", (kd,)),
                get("self_attn.v_proj.bias", (kd,)), args)
        yield dst + "self_attention.linear_proj.weight", get("self_attn.o_proj.weight", (h, qd))
        yield dst + "pre_mlp_layernorm.weight", get("post_attention_layernorm.weight", (h,))
        yield dst + "mlp.linear_fc1.weight", torch.cat(
            [get("mlp.gate_proj.weight", (f, h)), get("mlp.up_proj.weight", (f, h))], dim=0)
        yield dst + "mlp.linear_fc2.weight", get("mlp.down_proj.weight", (h, f))
    yield "decoder.final_layernorm.weight", _expect(r.get("model.norm.weight"), (h,), "model.norm.weight")
    if not args.tie_word_embeddings:
        yield "output_layer.weight", _expect(r.get("lm_head.weight"), (args.vocab_size, h), "lm_head.weight")
