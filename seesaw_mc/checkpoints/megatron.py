"""Megatron checkpoints -> full Megatron-named tensors (and back), for the supported decoders.

Two on-disk formats, both as Megatron-LM writes them (`latest_checkpointed_iteration.txt`
at the top, then `iter_NNNNNNN/` or `release/`):
  - legacy: `mp_rank_TT/` (pp = 1) or `mp_rank_TT_PPP/`, each with `model_optim_rng.pt`, a
    dict with `model` (this rank's state dict), `args` (the training argparse.Namespace) and
    `checkpoint_version`. TP shards are merged here by Megatron's own split rules.
  - torch_dist (`dist_checkpointing.save`): `metadata.json`, `common.pt` (args) and `*.distcp`.
    Read by building megatron-core's GPTModel at TP1/PP1 and calling
    `dist_checkpointing.load(model.sharded_state_dict())`: its resharding merges any TP/PP.
Hyper-parameters come from the saved args; what the engine cannot run (MoE, LayerNorm, GELU,
learned positions, biases, QK-norm) is rejected with one line. Optimizer state is never read.
Files are loaded with `weights_only=True` (argparse.Namespace allow-listed), never unpickled
freely.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from seesaw_mc.errors import ModelError
from seesaw_mc.model.hf_import import ModelArgs

ITER_FILE = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"


def _first_line(e: BaseException) -> str:
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


def _torch_load(path: str):
    torch.serialization.add_safe_globals(_safe_globals())
    try:
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
        raise ModelError(f"cannot read {path}: corrupt, truncated or not a Megatron checkpoint ({_first_line(e)})") \
            from None


def iteration_dir(path: str) -> str:
    """The folder holding one iteration's shards: `path` itself, or the one named by
    latest_checkpointed_iteration.txt."""
    if not os.path.isdir(path):
        raise ModelError(f"checkpoint folder {path!r} does not exist")
    marker = os.path.join(path, ITER_FILE)
    if os.path.exists(marker):
        with open(marker) as f:
            it = f.read().strip()
        sub = "release" if it == "release" else (f"iter_{int(it):07d}" if it.isdigit() else None)
        if sub is None:
            raise ModelError(f"{marker} holds {it!r}, not an iteration number or 'release'")
        path = os.path.join(path, sub)
        if not os.path.isdir(path):
            raise ModelError(f"{marker} names {sub}, which is missing")
    return path


def detect_format(path: str) -> Optional[str]:
    """"legacy", "torch_dist" or None (not a Megatron checkpoint)."""
    try:
        d = iteration_dir(path)
    except ModelError:
        return None
    if os.path.exists(os.path.join(d, "metadata.json")):
        return "torch_dist"
    if any(re.fullmatch(r"mp_rank_\d\d(_\d\d\d)?", n) for n in os.listdir(d)):
        return "legacy"
    return None


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


def _check_expected(where: str, tp: int, pp: int, expect_tp: Optional[int], expect_pp: Optional[int]) -> None:
    if expect_tp is not None and expect_tp != tp:
        raise ModelError(f"{where}: checkpoint was saved with TP {tp}, not --tp {expect_tp}")
    if expect_pp is not None and expect_pp != pp:
        raise ModelError(f"{where}: checkpoint was saved with PP {pp}, not --pp {expect_pp}")


# -- legacy mp_rank_* ------------------------------------------------------------------------
def _legacy_rank_dirs(d: str, tp: int, pp: int) -> List[List[str]]:
    found = sorted(n for n in os.listdir(d) if re.fullmatch(r"mp_rank_\d\d(_\d\d\d)?", n))
    want = [[f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}" for t in range(tp)] for p in range(pp)]
    flat = [n for row in want for n in row]
    missing = [n for n in flat if n not in found]
    if missing:
        raise ModelError(f"{d}: missing rank folder {missing[0]} (saved args say TP {tp} x PP {pp})"
                         + (f"; found {', '.join(found[:6])}" if found else ""))
    extra = [n for n in found if n not in flat]
    if extra:
        raise ModelError(f"{d}: rank folder {extra[0]} does not fit the saved TP {tp} x PP {pp}")
    return [[os.path.join(d, n, LEGACY_FILE) for n in row] for row in want]


def _merge_tp(name: str, shards: List[torch.Tensor], where: str) -> torch.Tensor:
    """Megatron's TP split rules, inverted (local layer spec)."""
    if len(shards) == 1:
        return shards[0]
    if name.endswith("layernorm.weight") or name.endswith("layer_norm_weight"):
        if any(not torch.equal(shards[0], s) for s in shards[1:]):
            raise ModelError(f"{where}: replicated tensor {name} differs between TP ranks")
        return shards[0]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)  # row-parallel
    if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)  # column-parallel: qkv (whole query groups), embedding, output layer


def read_legacy(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None):
    """-> (ModelArgs, {megatron name: full tensor}) from an mp_rank_* checkpoint."""
    d = iteration_dir(path)
    first = sorted(n for n in os.listdir(d) if n.startswith("mp_rank_"))
    if not first:
        raise ModelError(f"{d}: no mp_rank_* folders")
    head = _torch_load(os.path.join(d, first[0], LEGACY_FILE))
    if not isinstance(head, dict) or "model" not in head:
        raise ModelError(f"{d}/{first[0]}/{LEGACY_FILE}: no 'model' state dict")
    args, tp, pp = model_args_from_megatron(head.get("args"), d)
    _check_expected(d, tp, pp, expect_tp, expect_pp)
    files = _legacy_rank_dirs(d, tp, pp)
    tensors: Dict[str, torch.Tensor] = {}
    layer_offset = 0
    for stage, row in enumerate(files):
        per_rank = []
        for f in row:
            sd = head if f == os.path.join(d, first[0], LEGACY_FILE) else _torch_load(f)
            model = sd.get("model") if isinstance(sd, dict) else None
            if not isinstance(model, dict):
                raise ModelError(f"{f}: no 'model' state dict")
            if any(k.startswith("language_model.") for k in model):
                raise ModelError(f"{f}: a legacy (non megatron-core) Megatron-LM model; convert it to megatron-core "
                                 f"format with Megatron-LM's tools first")
            per_rank.append({k: v for k, v in model.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k})
        names = list(per_rank[0])
        for r, sd in enumerate(per_rank[1:], 1):
            if set(sd) != set(names):
                diff = sorted(set(sd) ^ set(names))[0]
                raise ModelError(f"{row[r]}: tensor set differs from TP rank 0 ({diff})")
        layers = sorted({int(m.group(1)) for n in names if (m := re.match(r"decoder\.layers\.(\d+)\.", n))})
        if layers != list(range(len(layers))):
            raise ModelError(f"{os.path.dirname(row[0])}: layer numbering {layers[:8]} is not 0..n-1")
        for n in names:
            full = _merge_tp(n, [sd[n] for sd in per_rank], os.path.dirname(row[0]))
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", n)
            key = f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else n
            if key in tensors and not key.startswith("embedding") and key != "output_layer.weight":
                raise ModelError(f"{os.path.dirname(row[0])}: tensor {key} appears in two pipeline stages")
            tensors.setdefault(key, full)
        layer_offset += len(layers)
    if layer_offset != args.num_layers:
        raise ModelError(f"{d}: the stages hold {layer_offset} layers, the saved args say {args.num_layers}"
                         + (" (missing layer)" if layer_offset < args.num_layers else ""))
    check_tensors(tensors, args, d)
    return args, tensors


# -- torch_dist --------------------------------------------------------------------------------
def read_torch_dist(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None):
    """-> (ModelArgs, {megatron name: full tensor}) through dist_checkpointing.load into
    megatron-core's GPTModel at TP1/PP1. Needs torch.distributed with one rank (started here
    if absent)."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    d = iteration_dir(path)
    try:
        with open(os.path.join(d, "metadata.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"{d}/metadata.json: {_first_line(e)}") from None
    if meta.get("sharded_backend") not in (None, "torch_dist"):
        raise ModelError(f"{d}: sharded backend {meta.get('sharded_backend')!r} is not supported (torch_dist only)")
    common = _torch_load(os.path.join(d, "common.pt"))
    args, tp, pp = model_args_from_megatron(common.get("args") if isinstance(common, dict) else None, d)
    _check_expected(d, tp, pp, expect_tp, expect_pp)
    mc.init_distributed()
    if dist.get_world_size() != 1:
        raise ModelError("reading a torch_dist checkpoint runs in one process (seesaw-mc convert), not under torchrun")
    mc.init_megatron_parallel(1, 1)
    model = mc.megatron_gpt_model(args)
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        with mc.cpu_device_shim():
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    except (Exception, CheckpointException) as e:  # missing/corrupt .distcp, shape mismatch...
        if isinstance(e, CheckpointException) and e.failures:
            inner = next(iter(e.failures.values()))[0]
            why = f"{inner.__class__.__name__}: {_first_line(inner)}" if str(inner) else inner.__class__.__name__
        else:
            why = _first_line(e)
        raise ModelError(f"{d}: cannot load the distributed checkpoint: missing, truncated or mismatched "
                         f"shard files ({why})") from None
    model.load_state_dict(state["model"], strict=False)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    check_tensors(tensors, args, d)
    return args, tensors


def check_tensors(tensors: Dict[str, torch.Tensor], args: ModelArgs, where: str) -> None:
    """Every tensor the engine needs is there with the shape the args imply."""
    h, f, d = args.hidden_size, args.ffn_hidden_size, args.head_dim
    qkv = (args.num_heads + 2 * args.num_kv_heads) * d
    want = {"embedding.word_embeddings.weight": (args.vocab_size, h), "decoder.final_layernorm.weight": (h,)}
    if not args.tie_word_embeddings:
        want["output_layer.weight"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"decoder.layers.{i}."
        want.update({p + "input_layernorm.weight": (h,), p + "self_attention.linear_qkv.weight": (qkv, h),
                     p + "self_attention.linear_proj.weight": (h, args.num_heads * d),
                     p + "pre_mlp_layernorm.weight": (h,), p + "mlp.linear_fc1.weight": (2 * f, h),
                     p + "mlp.linear_fc2.weight": (h, f)})
        if args.qkv_bias:
            want[p + "self_attention.linear_qkv.bias"] = (qkv,)
    for name, shape in want.items():
        if name not in tensors:
            layer = re.match(r"decoder\.layers\.(\d+)\.", name)
            raise ModelError(f"{where}: missing tensor {name}" + (f" (layer {layer.group(1)})" if layer else ""))
        if tuple(tensors[name].shape) != shape:
            raise ModelError(f"{where}: tensor {name} has shape {tuple(tensors[name].shape)}, the saved args imply "
                             f"{shape}")


def read_checkpoint(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None):
    fmt = detect_format(path)
    if fmt is None:
        raise ModelError(f"{path}: not a Megatron checkpoint (no {ITER_FILE}, mp_rank_* folders or "
                         f"torch_dist metadata.json)")
    reader = read_legacy if fmt == "legacy" else read_torch_dist
    return reader(path, expect_tp, expect_pp)


# -- writing -----------------------------------------------------------------------------------
def write_torch_dist(out: str, args: ModelArgs, tensors: Iterator[Tuple[str, torch.Tensor]], iteration: int = 1):
    """Full Megatron tensors -> a torch_dist checkpoint saved by megatron-core's GPTModel at
    TP1/PP1 (dist_checkpointing can load it under any TP/PP). One process."""
    import torch.distributed as dist

    from seesaw_mc.parallel import megatron_adapter as mc

    mc.init_distributed()
    if dist.get_world_size() != 1:
        raise ModelError("writing a checkpoint runs in one process (seesaw-mc convert), not under torchrun")
    mc.init_megatron_parallel(1, 1)
    model = mc.megatron_gpt_model(args)
    sd = model.state_dict()
    for name, t in tensors:
        if name not in sd:
            raise ModelError(f"tensor {name} has no place in megatron-core's GPTModel")
        sd[name].copy_(t)
    save_megatron(out, model, args, iteration)


def save_megatron(out: str, model, args: ModelArgs, iteration: int = 1, tp: int = 1, pp: int = 1) -> str:
    """dist_checkpointing.save of a GPTModel in Megatron-LM's layout (collective over the
    model's ranks). Returns the iteration folder."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from seesaw_mc.parallel import megatron_adapter as mc

    d = os.path.join(out, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(d, exist_ok=True)
    dist.barrier()
    state = {"model": model.sharded_state_dict(), "args": args_namespace(args, tp, pp),
             "checkpoint_version": 3.0, "iteration": iteration}
    with mc.cpu_device_shim():
        dist_checkpointing.save(state, d)
    if dist.get_rank() == 0:
        with open(os.path.join(out, ITER_FILE), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return d
