"""Checkpoint conversion: Megatron (legacy mp_rank_* or torch_dist, any TP/PP) <-> HF folders.

    seesaw-mc convert --input MEGATRON_DIR --output HF_DIR --tokenizer TOKENIZER_DIR
    seesaw-mc convert --input HF_DIR --output MEGATRON_DIR          # torch_dist, loadable at any TP/PP
"""
from __future__ import annotations

import os
from typing import Optional

from seesaw_mc.errors import ModelError


def convert(src: str, out: str, tokenizer: Optional[str] = None, tp: Optional[int] = None,
            pp: Optional[int] = None) -> str:
    """Megatron checkpoint -> HF folder, or HF folder -> Megatron torch_dist. Returns what was written."""
    from seesaw_mc.checkpoints import megatron

    if os.path.exists(out) and os.listdir(out):
        raise ModelError(f"output folder {out!r} exists and is not empty")
    if megatron.detect_format(src) is not None:
        from seesaw_mc.checkpoints.hf_export import write_hf

        args, tensors = megatron.read_checkpoint(src, tp, pp)
        write_hf(out, args, tensors, tokenizer)
        return "hf"
    if os.path.exists(os.path.join(src, "config.json")):
        if tp is not None or pp is not None:
            raise ModelError("--tp/--pp describe a Megatron input; an HF folder has no parallel layout")
        from seesaw_mc.model.hf_import import iter_megatron_tensors, load_model_args

        args = load_model_args(src)
        megatron.write_torch_dist(out, args, iter_megatron_tensors(src, args))
        return "megatron"
    if not os.path.isdir(src):
        raise ModelError(f"input folder {src!r} does not exist")
    raise ModelError(f"{src}: neither a Megatron checkpoint nor an HF model folder (config.json)")
