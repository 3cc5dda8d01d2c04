"""megatron-core's fusions are decorated with `torch.compile` when their modules import
(`megatron.core.jit.jit_fuser`). The engine calls none of them (its TransformerConfig turns every
fusion off), but the first decoration costs about 2.6 s of start-up in every process: it imports
the rest of TorchDynamo and Inductor (measured, torch 2.13, 2 cores). This finder runs
megatron-core's own `disable_jit_fuser()` the moment `megatron.core.jit` has loaded, before any
module decorates with it, so the fusions stay plain eager functions.

Stdlib only: `seesaw_mc/__init__.py` installs it before anything imports megatron-core.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_NAME = "megatron.core.jit"


class _DisableJitFuser(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            disable = getattr(module, "disable_jit_fuser", None)
            if disable is not None:  # megatron-core >= 0.9
                disable()

        spec.loader.exec_module = exec_module
        return spec


def install() -> bool:
    """True when megatron-core's fusions will import uncompiled (False: it was imported already)."""
    if _NAME in sys.modules:
        return False
    if not any(isinstance(f, _DisableJitFuser) for f in sys.meta_path):
        sys.meta_path.insert(0, _DisableJitFuser())
    return True
