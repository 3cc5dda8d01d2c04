"""Checkpoint conversion: Megatron (legacy mp_rank_* or torch_dist, any TP/PP) <-> HF folders.

    seesaw-mc convert --input MEGATRON_DIR --output HF_DIR --tokenizer TOKENIZER_DIR
    seesaw-mc convert --input HF_DIR --output MEGATRON_DIR          # torch_dist, loadable at any TP/PP

detect.py finds the format, megatron_args.py reads the saved hyper-parameters, legacy.py and
torch_dist.py the tensors; hf_export.py writes the HF folder. Nothing in a checkpoint is
unpickled freely: pickles go through allow-lists (megatron_args.py, dcp_metadata.py), and
`--trust-checkpoint` lifts the one on a torch_dist `.metadata`.
"""
from __future__ import annotations

import os
from typing import Optional

from seesaw_mc.checkpoints.detect import ITER_FILE, detect_format
from seesaw_mc.errors import ModelError


def read_megatron(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None,
                  trust: bool = False):
    """-> (ModelArgs, {megatron name: full tensor}) of a Megatron checkpoint of either format.
    `trust`: a torch_dist `.metadata` may name any global (it is unpickled without allow-list)."""
    fmt = detect_format(path)
    if fmt is None:
        raise ModelError(f"{path}: not a Megatron checkpoint (no {ITER_FILE}, mp_rank_* folders or "
                         f"torch_dist metadata.json)")
    if fmt == "legacy":
        from seesaw_mc.checkpoints.legacy import read_legacy

        return read_legacy(path, expect_tp, expect_pp)  # weights_only pickles: there is nothing to trust
    from seesaw_mc.checkpoints.torch_dist import read_torch_dist

    return read_torch_dist(path, expect_tp, expect_pp, trust)


def convert(src: str, out: str, tokenizer: Optional[str] = None, tp: Optional[int] = None,
            pp: Optional[int] = None, trust: bool = False) -> str:
    """Megatron checkpoint -> HF folder, or HF folder -> Megatron torch_dist. Returns what was written."""
    if os.path.exists(out) and os.listdir(out):
        raise ModelError(f"output folder {out!r} exists and is not empty")
    if detect_format(src) is not None:
        from seesaw_mc.checkpoints.hf_export import write_hf

        args, tensors = read_megatron(src, tp, pp, trust)
        write_hf(out, args, tensors, tokenizer)
        return "hf"
    if os.path.exists(os.path.join(src, "config.json")):
        if tp is not None or pp is not None:
            raise ModelError("--tp/--pp describe a Megatron input; an HF folder has no parallel layout")
        from seesaw_mc.checkpoints.torch_dist import write_torch_dist
        from seesaw_mc.model.hf_import import iter_megatron_tensors
        from seesaw_mc.model_spec import load_model_args

        args = load_model_args(src)
        write_torch_dist(out, args, iter_megatron_tensors(src, args))
        return "megatron"
    if not os.path.isdir(src):
        raise ModelError(f"input folder {src!r} does not exist")
    raise ModelError(f"{src}: neither a Megatron checkpoint nor an HF model folder (config.json)")
