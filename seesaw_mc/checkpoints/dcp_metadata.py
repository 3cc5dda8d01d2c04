"""A torch_dist checkpoint's `.metadata` (torch DCP's index of the shards) read without running
its code.

DCP writes it with plain pickle and reads it back with `pickle.load`, which runs whatever a
crafted file names. Here it is unpickled through an allow-list: DCP's own metadata records
(dataclasses and enums of its metadata, planner and filesystem modules), torch.Size, dtypes,
layouts and plain containers. Anything else is refused with one line, unless the user says
the checkpoint is trusted (`seesaw-mc convert --trust-checkpoint`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import os
import pickle

import torch

from seesaw_mc.errors import ModelError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_OTHERS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
           ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = None
        if "." not in name:  # a dotted name walks attributes: "os.system" of a module that imports os
            if module in _DCP_MODULES:
                cls = getattr(importlib.import_module(module), name, None)
                # Records only: their construction sets fields and runs nothing else.
                if isinstance(cls, type) and cls.__module__ == module and (
                        dataclasses.is_dataclass(cls) or issubclass(cls, enum.Enum)):
                    obj = cls
            elif (module, name) in _OTHERS:
                obj = super().find_class(module, name)
            elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                obj = getattr(torch, name)
        if obj is None:
            raise RefusedGlobal(f"{module}.{name}")
        return obj


def _restricted_load(f, **_ignored):
    return _MetadataUnpickler(f).load()


def check_metadata(iteration_dir: str) -> None:
    """Refuse (ModelError, one line) a `.metadata` that names anything but metadata records."""
    path = os.path.join(iteration_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            _restricted_load(f)
    except FileNotFoundError:
        raise ModelError(f"{path} is missing (torch_dist checkpoints keep their shard index there)") from None
    except RefusedGlobal as e:
        raise ModelError(f"{path} would run {e} when unpickled, which is not checkpoint metadata; refused "
                         f"(pass --trust-checkpoint only if you trust where this checkpoint came from)") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle
        raise ModelError(f"{path}: corrupt or truncated ({e.__class__.__name__})") from None


@contextlib.contextmanager
def restricted_metadata_reads():
    """While DCP loads, its own read of `.metadata` goes through the allow-list too: the
    file checked above cannot be swapped for another between the check and the load."""
    from torch.distributed.checkpoint import filesystem

    if not isinstance(getattr(filesystem, "pickle", None), type(pickle)):
        yield  # torch no longer reads it with the pickle module; check_metadata still ran
        return

    class _Pickle:  # the pickle module, but load restricted
        load = staticmethod(_restricted_load)

        def __getattr__(self, name):
            return getattr(pickle, name)

    original, filesystem.pickle = filesystem.pickle, _Pickle()
    try:
        yield
    finally:
        filesystem.pickle = original
