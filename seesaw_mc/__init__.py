"""seesaw-mc: throughput-first offline LLM inference with dynamic re-sharding (Seesaw, MLSys'25).

`from seesaw_mc import LLM, SamplingParams`. Heavy modules (torch, megatron-core) load on
first use, so the pure-Python parts (scheduler, block manager) import without torch.
"""
from seesaw_mc import _megatron_jit
from seesaw_mc.sampling_params import SamplingParams

_megatron_jit.install()

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    if name in ("LLM", "RequestOutput", "CompletionOutput"):
        from seesaw_mc import api

        return getattr(api, name)
    raise AttributeError(name)
