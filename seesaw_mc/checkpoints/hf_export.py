"""Full Megatron-named tensors -> an HF transformers folder (config.json + safetensors), the
inverse of model/hf_import.py, so a Megatron checkpoint can be checked against HF
transformers and served by the engine."""
from __future__ import annotations

import os
import shutil
from typing import Dict, Iterator, Optional, Tuple

import torch

from seesaw_mc import model_switches as switches
from seesaw_mc.errors import ModelError
from seesaw_mc.model.hf_names import hf_sources
from seesaw_mc.model_spec import ModelArgs, megatron_tensor_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def unpack_qkv(t: torch.Tensor, args: ModelArgs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron linear_qkv rows (per query group: q heads, k, v) -> HF q, k, v."""
    g, qpg, d = args.num_kv_heads, args.q_per_group, args.head_dim
    rest = t.shape[1:]
    x = t.reshape(g, (qpg + 2) * d, *rest)
    q, k, v = x[:, : qpg * d], x[:, qpg * d: (qpg + 1) * d], x[:, (qpg + 1) * d:]
    return (q.reshape(g * qpg * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def hf_tensors(tensors: Dict[str, torch.Tensor], args: ModelArgs) -> Iterator[Tuple[str, torch.Tensor]]:
    """Full Megatron tensors -> HF tensors (model/hf_import.py's inverse)."""
    for name, shape in megatron_tensor_shapes(args).items():
        t = tensors[name]
        if ".linear_qkv." in name:
            t = torch.cat(unpack_qkv(t, args), dim=0)  # [q; k; v]
        src = hf_sources(name, shape, args)
        parts = t.split([s[0] for _, s in src.parts], dim=0)  # [q; k; v], [gate; up] or the one tensor
        for (hf_name, _), part in zip(src.parts, parts):
            yield hf_name, (part.t() if src.transposed else part).contiguous()


def hf_config(args: ModelArgs, eos_token_id=None, bos_token_id=None):
    """The transformers config of args.architecture (model_switches.to_hf names its fields)."""
    import transformers as tf

    model_type, kw = switches.to_hf(args)
    cfg = tf.AutoConfig.for_model(model_type, **kw, eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    cfg.architectures = [args.architecture]
    cfg.torch_dtype = args.torch_dtype
    return cfg


def write_hf(out: str, args: ModelArgs, tensors: Dict[str, torch.Tensor], tokenizer: Optional[str] = None,
             dtype: Optional[torch.dtype] = None) -> str:
    """Write config.json + model.safetensors (+ the tokenizer files of `tokenizer`)."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    eos = bos = None
    if tokenizer:
        if not os.path.isdir(tokenizer):
            raise ModelError(f"tokenizer folder {tokenizer!r} does not exist")
        copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(tokenizer, f))]
        if not copied:
            raise ModelError(f"tokenizer folder {tokenizer!r} has no tokenizer files")
        for f in copied:
            shutil.copy2(os.path.join(tokenizer, f), os.path.join(out, f))
        try:
            import json

            with open(os.path.join(tokenizer, "config.json")) as f:
                src = json.load(f)
            eos, bos = src.get("eos_token_id"), src.get("bos_token_id")
        except (OSError, ValueError):
            pass
    hf_config(args, eos, bos).save_pretrained(out)
    out_tensors = {}
    for name, t in hf_tensors(tensors, args):
        t = t.detach().to(dtype or t.dtype).contiguous()
        out_tensors[name] = t.clone() if any(t.data_ptr() == o.data_ptr() for o in out_tensors.values()) else t
    save_file(out_tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return out
