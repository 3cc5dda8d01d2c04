"""Legacy Megatron-LM checkpoints: `mp_rank_TT/` (pp = 1) or `mp_rank_TT_PPP/`, each with
`model_optim_rng.pt`, a dict with `model` (this rank's state dict), `args` (the training
argparse.Namespace) and `checkpoint_version`. TP shards are merged by the inverse of the
split rules (model/sharding.py), PP stages renumbered into one layer sequence."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional

import torch

from seesaw_mc.checkpoints.detect import LEGACY_FILE, RANK_DIR, iteration_dir
from seesaw_mc.checkpoints.megatron_args import check_expected, check_tensors, load_pt, model_args_from_megatron
from seesaw_mc.errors import ModelError
from seesaw_mc.model.sharding import merge_tp


def _legacy_rank_dirs(d: str, tp: int, pp: int) -> List[List[str]]:
    found = sorted(n for n in os.listdir(d) if re.fullmatch(RANK_DIR, n))
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


def read_legacy(path: str, expect_tp: Optional[int] = None, expect_pp: Optional[int] = None):
    """-> (ModelArgs, {megatron name: full tensor}) from an mp_rank_* checkpoint."""
    d = iteration_dir(path)
    first = sorted(n for n in os.listdir(d) if n.startswith("mp_rank_"))
    if not first:
        raise ModelError(f"{d}: no mp_rank_* folders")
    head = load_pt(os.path.join(d, first[0], LEGACY_FILE))
    if not isinstance(head, dict) or "model" not in head:
        raise ModelError(f"{d}/{first[0]}/{LEGACY_FILE}: no 'model' state dict")
    args, tp, pp = model_args_from_megatron(head.get("args"), d)
    check_expected(d, tp, pp, expect_tp, expect_pp)
    files = _legacy_rank_dirs(d, tp, pp)
    tensors: Dict[str, torch.Tensor] = {}
    layer_offset = 0
    for row in files:
        per_rank = []
        for f in row:
            sd = head if f == os.path.join(d, first[0], LEGACY_FILE) else load_pt(f)
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
            full = merge_tp(n, [sd[n] for sd in per_rank], os.path.dirname(row[0]), args.gated_mlp)
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
