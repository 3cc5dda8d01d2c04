"""Kernel selection: explicit, cached, and on CPU the fused CPU ops (where they built) or torch,
with no import of the CUDA-only candidates failing the run."""
import builtins
import logging

import pytest
import torch

from seesaw_mc.errors import ConfigError
from seesaw_mc.model import fused_ops, kernels


@pytest.fixture(autouse=True)
def fresh_cache():
    kernels._CACHE.clear()
    yield
    kernels._CACHE.clear()


@pytest.mark.parametrize("requested", ["auto", "deepspeed", "apex", "torch"])
def test_cpu_falls_back_to_torch(requested, caplog):
    with caplog.at_level(logging.INFO, logger="seesaw_mc"):
        choice = kernels.select_kernels(requested, torch.device("cpu"), torch.float32, 64, 1e-6)
    fused = requested != "torch" and fused_ops.available(torch.float32)[0]
    assert choice.rmsnorm == ("cpu-op" if fused else "torch") and choice.fused == fused
    if requested in ("auto", "deepspeed", "apex"):
        cuda = {k: v for k, v in choice.skipped.items() if k != "fused"}
        assert all(v == "CUDA-only" for v in cuda.values()) and cuda
    assert [r.getMessage() for r in caplog.records] == [f"kernels: {choice.describe()}"]
    # Cached: a second engine in the process neither re-probes nor logs again.
    caplog.clear()
    assert kernels.select_kernels(requested, torch.device("cpu"), torch.float32, 64, 1e-6) is choice
    assert not caplog.records


def test_failing_candidate_is_skipped_not_raised(monkeypatch):
    """A candidate whose import fails (as apex does where it is not installed) is skipped
    with its reason, and the next one is tried, even on a CUDA device."""
    real_import = builtins.__import__

    def no_apex(name, *a, **k):
        if name.startswith("apex") or name.startswith("deepspeed.inference"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_apex)
    choice = kernels.select_kernels("auto", torch.device("cuda", 0), torch.float32, 64, 1e-6, log_once=False)
    assert choice.rmsnorm == "torch"
    assert "No module named" in choice.skipped["apex"] and "No module named" in choice.skipped["deepspeed"]


def test_torch_rmsnorm_matches_hf_formula():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                            use_cpu_initialization=True, layernorm_epsilon=1e-6)
    norm = WrappedTorchNorm(cfg, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(5, 64)
    choice = kernels.select_kernels("auto", torch.device("cpu"), torch.float32, 64, 1e-6, log_once=False)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(kernels.rmsnorm(choice, norm, x), want)


def test_unknown_choice():
    with pytest.raises(ConfigError, match="kernels must be one of"):
        kernels.select_kernels("triton", torch.device("cpu"), torch.float32, 64, 1e-6)
