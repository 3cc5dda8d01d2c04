"""HF checkpoint import: safetensors -> full Megatron-named tensors, shapes checked against
config.json (model_spec says which HF tensors make each Megatron tensor, and their shapes)."""
from __future__ import annotations

import os
from typing import Dict, Iterator, Tuple

import torch

from seesaw_mc.errors import ModelError
from seesaw_mc.model.hf_names import hf_sources, qkv_rows
from seesaw_mc.model_spec import ModelArgs, megatron_tensor_shapes


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
            # A checkpoint saved from the bare base model (GPT2Model, LlamaModel: the hub's gpt2 is one)
            # lacks the `transformer.` / `model.` prefix.
            bare = name.split(".", 1)[1]
            if bare not in self._where:
                raise ModelError(f"checkpoint is missing tensor {name!r}")
            name = bare
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
    for name, shape in megatron_tensor_shapes(args).items():
        src = hf_sources(name, shape, args)
        parts = [_expect(r.get(hf), src.disk_shape(i), hf) for i, (hf, _) in enumerate(src.parts)]
        if src.transposed:  # Conv1D: [in, out] -> Linear's [out, in]
            parts = [p.t() for p in parts]
        full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # [q; k; v] or [gate; up]
        if ".linear_qkv." in name:
            full = pack_qkv(*full.split(qkv_rows(args), dim=0), args)
        yield name, full.contiguous() if src.transposed else full
