"""Is a folder a Megatron-LM checkpoint, and which kind? Torch-free, so that loading an HF
folder can point at `seesaw-mc convert` without importing the readers.

Megatron-LM writes `latest_checkpointed_iteration.txt` at the top, then `iter_NNNNNNN/` or
`release/` holding either `mp_rank_TT[_PPP]/model_optim_rng.pt` (legacy) or `metadata.json`
+ `*.distcp` (torch_dist).
"""
from __future__ import annotations

import os
import re
from typing import Optional

from seesaw_mc.errors import ModelError

ITER_FILE = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"
RANK_DIR = r"mp_rank_\d\d(_\d\d\d)?"


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
    if any(re.fullmatch(RANK_DIR, n) for n in os.listdir(d)):
        return "legacy"
    return None
