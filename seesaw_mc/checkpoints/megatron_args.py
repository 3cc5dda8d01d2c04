"""What Megatron-LM saves beside the weights: the training args (-> ModelArgs and back), and
the pickles that hold them, read with `weights_only=True` (argparse.Namespace and the numpy
types Megatron-LM stores allow-listed, for the call only), never unpickled freely; a
torch_dist `.metadata` goes through dcp_metadata.py's allow-list. Optimizer state is never read.

Hyper-parameters come from the saved args; what the engine cannot run (MoE, LayerNorm, GELU,
learned positions, biases, QK-norm) is rejected with one line.
"""
from __future__ import annotations

import argparse
import re
from typing import Dict, Optional, Tuple

import torch

from seesaw_mc.errors import ModelError
from seesaw_mc.model_spec import ModelArgs, megatron_tensor_shapes


def first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)[:200]


def _safe_globals() -> list:
    """What Megatron-LM pickles besides tensors: its args, numpy RNG state, TE's extra state."""
    import io

    import numpy as np

    out = [argparse.Namespace, io.BytesIO, np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    out.append(core.multiarray._reconstruct)
    out.extend(t for t in vars(getattr(np, "dtypes", object)).values() if isinstance(t, type))
    return out


def allowed_globals():
    """The allow-list for torch.load(weights_only=True), for the `with` block only:
    add_safe_globals would widen it for the whole process, and for whoever imports us."""
    return torch.serialization.safe_globals(_safe_globals())


def load_pt(path: str):
    try:
        with allowed_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # truncated zip, bad pickle, a global outside the allow-list...
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - unreadable as a zip: corrupt or truncated
            unsafe = []
        if unsafe:
            raise ModelError(f"cannot read {path}: it pickles {unsafe[0]}, which is not loaded for safety "
                             f"(weights_only)") from None
        raise ModelError(f"cannot read {path}: corrupt, truncated or not a Megatron checkpoint ({first_line(e)})") \
            from None


# -- hyper-parameters ------------------------------------------------------------------------
def model_args_from_megatron(ns, where: str) -> Tuple[ModelArgs, int, int]:
    """Saved Megatron-LM args -> (ModelArgs, tp, pp) of the checkpoint; one-line errors."""
    a = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns or {})
    if not a:
        raise ModelError(f"{where}: no saved 'args' (needed for the model's hyper-parameters)")

    def unsupported(what: str):
        raise ModelError(f"{where}: unsupported model: {what} (supported: Llama-style decoders with RMSNorm, "
                         f"SwiGLU, RoPE, no linear biases, optional QKV bias)")

    if a.get("num_experts"):
        unsupported(f"mixture of experts ({a.get('num_experts')} experts)")
    if a.get("normalization", "LayerNorm") != "RMSNorm":
        unsupported(f"normalization {a.get('normalization', 'LayerNorm')!r}")
    if not a.get("swiglu", False):
        unsupported("activation is not SwiGLU")
    pos = a.get("position_embedding_type", "learned_absolute")
    if pos != "rope" and not a.get("use_rotary_position_embeddings", False):
        unsupported(f"position embedding {pos!r}")
    if a.get("add_bias_linear", True):
        unsupported("linear layers with bias (add_bias_linear)")
    if a.get("qk_layernorm", False):
        unsupported("QK layernorm")
    if float(a.get("rotary_percent", 1.0)) != 1.0:
        unsupported(f"partial rotary (rotary_percent={a['rotary_percent']})")
    if a.get("rope_scaling", False) or a.get("use_rope_scaling", False):
        unsupported("RoPE scaling")
    try:
        hidden = int(a["hidden_size"])
        heads = int(a["num_attention_heads"])
        groups = int(a.get("num_query_groups") or heads) if a.get("group_query_attention", False) else heads
        vocab = int(a.get("padded_vocab_size") or a["vocab_size"])
        args = ModelArgs(
            architecture="Qwen2ForCausalLM" if a.get("add_qkv_bias", False) else "LlamaForCausalLM",
            vocab_size=vocab, hidden_size=hidden,
            ffn_hidden_size=int(a.get("ffn_hidden_size") or 4 * hidden),
            num_layers=int(a["num_layers"]), num_heads=heads, num_kv_heads=groups,
            head_dim=int(a.get("kv_channels") or hidden // heads),
            rope_theta=float(a.get("rotary_base", 10000)), rms_norm_eps=float(a.get("norm_epsilon", 1e-5)),
            qkv_bias=bool(a.get("add_qkv_bias", False)),
            tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False),
            max_position_embeddings=int(a.get("max_position_embeddings") or a.get("seq_length") or 2048),
            sliding_window=None,
            torch_dtype="bfloat16" if a.get("bf16") else ("float16" if a.get("fp16") else "float32"),
        )
        tp = int(a.get("tensor_model_parallel_size", 1))
        pp = int(a.get("pipeline_model_parallel_size", 1))
    except KeyError as e:
        raise ModelError(f"{where}: saved args lack {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: saved args have an invalid value ({e})") from None
    if heads % args.num_kv_heads:
        raise ModelError(f"{where}: {heads} attention heads are not a multiple of {args.num_kv_heads} query groups")
    return args, tp, pp


def args_namespace(args: ModelArgs, tp: int = 1, pp: int = 1) -> argparse.Namespace:
    """ModelArgs -> the Megatron-LM training args that describe the same model."""
    return argparse.Namespace(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_heads, group_query_attention=args.num_kv_heads != args.num_heads,
        num_query_groups=args.num_kv_heads, kv_channels=args.head_dim, normalization="RMSNorm",
        norm_epsilon=args.rms_norm_eps, swiglu=True, position_embedding_type="rope", rotary_base=args.rope_theta,
        rotary_percent=1.0, untie_embeddings_and_output_weights=not args.tie_word_embeddings, add_bias_linear=False,
        add_qkv_bias=args.qkv_bias, padded_vocab_size=args.vocab_size, vocab_size=args.vocab_size,
        max_position_embeddings=args.max_position_embeddings, seq_length=args.max_position_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, num_experts=None,
        bf16=args.torch_dtype == "bfloat16", fp16=args.torch_dtype == "float16")


def check_expected(where: str, tp: int, pp: int, expect_tp: Optional[int], expect_pp: Optional[int]) -> None:
    if expect_tp is not None and expect_tp != tp:
        raise ModelError(f"{where}: checkpoint was saved with TP {tp}, not --tp {expect_tp}")
    if expect_pp is not None and expect_pp != pp:
        raise ModelError(f"{where}: checkpoint was saved with PP {pp}, not --pp {expect_pp}")


def check_tensors(tensors: Dict[str, torch.Tensor], args: ModelArgs, where: str) -> None:
    """Every tensor the engine needs is there with the shape the args imply."""
    for name, shape in megatron_tensor_shapes(args).items():
        if name not in tensors:
            layer = re.match(r"decoder\.layers\.(\d+)\.", name)
            raise ModelError(f"{where}: missing tensor {name}" + (f" (layer {layer.group(1)})" if layer else ""))
        if tuple(tensors[name].shape) != shape:
            raise ModelError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the saved args imply "
                             f"{shape}")
