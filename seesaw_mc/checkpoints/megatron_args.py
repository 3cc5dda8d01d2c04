"""What Megatron-LM saves beside the weights: the training args (-> ModelArgs and back), and
the pickles that hold them, read with `weights_only=True` (argparse.Namespace and the numpy
types Megatron-LM stores allow-listed, for the call only), never unpickled freely; a
torch_dist `.metadata` goes through dcp_metadata.py's allow-list. Optimizer state is never read.

Hyper-parameters come from the saved args through the switch table (model_switches.py); what
the engine cannot run (MoE, ALiBi or other position schemes, sliding windows, partial or scaled
RoPE, ...) is rejected with one line that names the argument.
"""
from __future__ import annotations

import argparse
import re
from typing import Dict, Optional, Tuple

import torch

from seesaw_mc import model_switches as switches
from seesaw_mc.errors import ModelError
from seesaw_mc.model_spec import ModelArgs, check_model_args, megatron_tensor_shapes


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
# Saved Megatron-LM arguments that change the forward pass in a way the engine does not
# implement: (argument, is_unsupported(value), what it is). Absent means Megatron-LM's default.
_UNSUPPORTED = (
    ("num_experts", bool, "mixture of experts"),
    ("normalization", lambda v: v not in ("LayerNorm", "RMSNorm"), "normalization"),
    ("position_embedding_type", lambda v: v not in ("rope", "learned_absolute"), "position embedding"),
    ("squared_relu", bool, "squared-ReLU MLP"),
    ("qk_l2_norm", bool, "L2 q/k norm"),
    ("multi_latent_attention", bool, "multi-latent attention"),
    ("apply_layernorm_1p", bool, "zero-centred LayerNorm (1 + weight)"),
    ("layernorm_zero_centered_gamma", bool, "zero-centred LayerNorm (1 + weight)"),
    ("apply_residual_connection_post_layernorm", bool, "residual taken after the norm"),
    ("rotary_percent", lambda v: float(v) != 1.0, "partial rotary"),
    ("rotary_interleaved", bool, "interleaved rotary"),
    ("rope_scaling", bool, "RoPE scaling"),
    ("use_rope_scaling", bool, "RoPE scaling"),
    ("window_size", bool, "sliding-window attention"),
    ("heterogeneous_layers_config_path", bool, "heterogeneous layers"),
)


def model_args_from_megatron(ns, where: str) -> Tuple[ModelArgs, int, int]:
    """Saved Megatron-LM args -> (ModelArgs, tp, pp) of the checkpoint; one-line errors."""
    a = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns or {})
    if not a:
        raise ModelError(f"{where}: no saved 'args' (needed for the model's hyper-parameters)")
    for key, bad, what in _UNSUPPORTED:
        value = a.get(key)
        if value is not None and bad(value):
            detail = f" ({value} experts)" if key == "num_experts" else ""
            raise ModelError(f"{where}: unsupported model: {what}{detail} ({key}={value!r})")
    try:
        fields = switches.from_megatron_lm(a)
        fields["architecture"] = switches.hf_architecture(fields, where)
        args = ModelArgs(
            **fields, sliding_window=None,
            torch_dtype="bfloat16" if a.get("bf16") else ("float16" if a.get("fp16") else "float32"))
        tp = int(a.get("tensor_model_parallel_size", 1))
        pp = int(a.get("pipeline_model_parallel_size", 1))
    except KeyError as e:
        raise ModelError(f"{where}: saved args lack {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: saved args have an invalid value ({e})") from None
    return check_model_args(args, where), tp, pp


def args_namespace(args: ModelArgs, tp: int = 1, pp: int = 1) -> argparse.Namespace:
    """ModelArgs -> the Megatron-LM training args that describe the same model."""
    return argparse.Namespace(**switches.to_megatron_lm(args), tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, bf16=args.torch_dtype == "bfloat16",
                              fp16=args.torch_dtype == "float16")


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
