"""The fused CPU ops (model/fused_ops.py) against torch's chain of ops on random inputs, the
choice and its fallbacks, and the engine's greedy tokens with and without them."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seesaw_mc import LLM, SamplingParams
from seesaw_mc.model import fused_ops, kernels
from seesaw_mc.parallel import megatron_adapter as mc

pytestmark = pytest.mark.skipif(not fused_ops.available(torch.float32)[0],
                                reason=f"fused ops unavailable: {fused_ops.available(torch.float32)[1]}")


@pytest.mark.parametrize("tokens,heads,kv_heads,dim", [(1, 8, 4, 64), (7, 8, 4, 64), (33, 4, 1, 12), (5, 6, 6, 6)])
def test_rope_in_the_qkv_buffer_matches_megatron(tokens, heads, kv_heads, dim):
    torch.manual_seed(0)
    args = SimpleNamespace(head_dim=dim, rope_theta=10000.0)
    table = mc.rotary_table(args, 64, torch.device("cpu"))
    positions = torch.randint(0, 64, (tokens,))
    group = heads // kv_heads
    qkv = torch.randn(tokens, kv_heads, group + 2, dim)
    want_q = mc.apply_rope(qkv[:, :, :-2].reshape(tokens, 1, heads, dim), table[positions])
    want_k = mc.apply_rope(qkv[:, :, -2:-1].reshape(tokens, 1, kv_heads, dim), table[positions])
    v = qkv[:, :, -1].clone()
    fused_ops.rotary_(qkv[:, :, :-1], fused_ops.rope_rows(*fused_ops.rope_tables(table), positions))
    torch.testing.assert_close(qkv[:, :, :-2].reshape(tokens, 1, heads, dim), want_q, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(qkv[:, :, -2:-1].reshape(tokens, 1, kv_heads, dim), want_k, atol=2e-6, rtol=1e-6)
    assert torch.equal(qkv[:, :, -1], v)


@pytest.mark.parametrize("tokens,hidden", [(1, 512), (5, 512), (33, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(tokens, hidden, dtype):
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(hidden, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    residual, x = torch.randn(tokens, hidden, dtype=dtype) * 3, torch.randn(tokens, hidden, dtype=dtype)
    want_residual = residual + x
    want = norm(want_residual)
    with torch.inference_mode():
        got = fused_ops.add_rms_norm(x, residual, norm)
        plain = fused_ops.rms_norm(norm, want_residual)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(plain, want, **tol)


@pytest.mark.parametrize("tokens,width,pairs", [(1, 1408, 1), (9, 1408, 2), (3, 40, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_honours_the_pairs_interleave(tokens, width, pairs, dtype):
    torch.manual_seed(0)
    h = torch.randn(tokens, 2 * width, dtype=dtype) * 4
    h[0, :4] = torch.tensor([-100.0, 100.0, -87.5, 0.0], dtype=dtype)  # exp's clamped ends
    chunks = h.view(tokens, pairs, 2, -1)
    gate, up = chunks[:, :, 0].reshape(tokens, -1), chunks[:, :, 1].reshape(tokens, -1)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(fused_ops.silu_and_mul(h, pairs), F.silu(gate) * up, **tol)


def test_choice_and_its_opt_outs(monkeypatch):
    kernels._CACHE.clear()
    cpu = torch.device("cpu")
    assert kernels.select_kernels("auto", cpu, torch.float32, 64, 1e-5).fused
    assert not kernels.select_kernels("torch", cpu, torch.float32, 64, 1e-5).fused
    assert not kernels.select_kernels("auto", cpu, torch.float16, 64, 1e-5).fused
    monkeypatch.setenv("SEESAW_FUSED_OPS", "0")
    off = kernels.select_kernels("auto", cpu, torch.float32, 64, 1e-5)
    assert not off.fused and off.skipped["fused"] == "SEESAW_FUSED_OPS=0"


def _greedy(path, prompts, **kw):
    llm = LLM(path, dtype="float32", **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12),
                        use_tqdm=False)
    return llm.engine.runner.models["prefill"].kernels.fused, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_tokens_equal_with_and_without_the_ops(tiny_models, monkeypatch, family):
    """gpt2 (LayerNorm) never takes them; the fallback gives the same tokens."""
    prompts = [[5, 9, 17, 33, 2, 8][:n] * 3 for n in (1, 2, 6)] + [list(range(10, 70))]
    fused, tokens = _greedy(tiny_models[family], prompts)
    assert fused == (family == "llama")
    monkeypatch.setenv("SEESAW_FUSED_OPS", "0")
    assert _greedy(tiny_models[family], prompts) == (False, tokens)
    monkeypatch.delenv("SEESAW_FUSED_OPS")
    assert _greedy(tiny_models[family], prompts, kernels="torch") == (False, tokens)
