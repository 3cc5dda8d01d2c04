"""The models the planner plans for: the paper's, or any HF config.json (geometry only)."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Dict, Optional

from seesaw_mc.errors import ConfigError
from seesaw_mc.model_spec import ModelShape

# Paper models (fp16). LLaMA3-15B is our reading of the paper's model: Llama-3-8B's geometry
# with 64 layers (15.0B parameters); the others are the public configs.
MODEL_PRESETS: Dict[str, ModelShape] = {
    "LLaMA3-15B": ModelShape("LLaMA3-15B", 64, 4096, 14336, 32, 8, 128256),
    "LLaMA2-13B": ModelShape("LLaMA2-13B", 40, 5120, 13824, 40, 40, 32000),
    "CodeLLaMA-34B": ModelShape("CodeLLaMA-34B", 48, 8192, 22016, 64, 8, 32016),
    "LLaMA2-70B": ModelShape("LLaMA2-70B", 80, 8192, 28672, 64, 8, 32000),
}


def resolve_model(spec: str, dtype_bytes: Optional[int] = None) -> ModelShape:
    """A preset name, an HF config.json, or a model folder holding one."""
    for name, shape in MODEL_PRESETS.items():
        if spec.lower() == name.lower():
            return replace(shape, dtype_bytes=dtype_bytes or shape.dtype_bytes)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(f"unknown model {spec!r}: give a config.json, a model folder or one of "
                          f"{', '.join(MODEL_PRESETS)}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model config {path!r}: {e}") from None
    return ModelShape.from_hf_config(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))),
                                     dtype_bytes=dtype_bytes)
