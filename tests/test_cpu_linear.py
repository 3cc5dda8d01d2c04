"""Linear layers through oneDNN with packed weights (model/cpu_linear.py), and up to SKINNY_ROWS
rows through the extension's skinny_linear: the same numbers as torch's matmul within fp32
rounding, rows that do not depend on the batch, packed only while their layout's weights are
loaded, and the engine's greedy tokens still equal HF's with either path."""
import logging

import pytest
import torch
import torch.nn.functional as F

from seesaw_mc import LLM, SamplingParams
from seesaw_mc.model import cpu_linear
from tiny_models import hf_greedy

pytestmark = pytest.mark.skipif(cpu_linear._unavailable("auto", torch.device("cpu"), torch.float32) is not None,
                                reason="this torch cannot pack fp32 linears for oneDNN")


def _skinny():
    op, why = cpu_linear.skinny_linear_op()
    if op is None:
        pytest.skip(f"skinny_linear unavailable: {why}")
    return op


def test_packed_matches_matmul_and_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w, b = torch.randn(300, 64), torch.randn(300)
    impl = cpu_linear.PackedLinear(w)
    x = torch.randn(40, 64)
    small = cpu_linear.SKINNY_ROWS
    for m in (1, 3, small, small + 1, 40):
        torch.testing.assert_close(impl(x[:m], w, b), F.linear(x[:m], w, b), atol=2e-5, rtol=1e-5)
    full, few = impl(x, w), impl(x[:small], w)
    for m in (1, small - 1):  # one row alone: MKL's gemv where ONE_ROW_GEMV (its own test below)
        assert torch.equal(impl(x[:m], w), torch.mv(w, x[0])[None] if m == 1 and cpu_linear.ONE_ROW_GEMV else few[:m])
    for m in (small + 1, 33):
        assert torch.equal(impl(x[:m], w), full[:m])


@pytest.mark.parametrize("n,k", [(300, 64), (1024, 512), (7, 13), (9, 1408), (16, 517)])
def test_skinny_linear_matches_fp64_and_its_rows_do_not_depend_on_the_batch(n, k):
    """N and K off multiples of 8 (4 and 16 on AVX-512) take the tails; one row takes the
    row-by-row path, more rows the eight-rows-at-a-time one (on AVX-512: tiles of up to six rows,
    and what is left), and every path must give the same bits for a row."""
    op = _skinny()
    torch.manual_seed(n + k)
    w, x = torch.randn(n, k), torch.randn(cpu_linear.SKINNY_ROWS + 2, k)
    full = op.skinny_linear(x, w)
    ref = x.double() @ w.double().t()
    assert (full.double() - ref).abs().max().item() < 1e-6 * k ** 0.5 * 10
    for m in range(1, x.shape[0]):
        assert torch.equal(op.skinny_linear(x[:m], w), full[:m]), m
        assert torch.equal(op.skinny_linear(x[m:m + 1], w), full[m:m + 1]), m
    strided = torch.randn(5, 2 * k)[:, :k]  # rows of x apart in memory
    assert torch.equal(op.skinny_linear(strided, w), op.skinny_linear(strided.contiguous(), w))
    shard = torch.randn(n, k + 24)[:, 8:8 + k]  # a row-parallel TP shard: weight rows apart in memory
    for m in (1, 3):
        assert torch.equal(op.skinny_linear(x[:m], shard), op.skinny_linear(x[:m], shard.contiguous()))


def test_skinny_linear_refuses_what_it_cannot_do():
    op = _skinny()
    with pytest.raises(RuntimeError, match="fp32 only"):
        op.skinny_linear(torch.ones(1, 8, dtype=torch.bfloat16), torch.ones(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="K must be contiguous"):
        op.skinny_linear(torch.ones(1, 8), torch.ones(8, 4).t())
    with pytest.raises(RuntimeError, match=r"x \[M, K\] and weight \[N, K\]"):
        op.skinny_linear(torch.ones(1, 8), torch.ones(4, 9))


def test_few_rows_take_skinny_linear_and_more_take_onednn(monkeypatch):
    op = _skinny()
    torch.manual_seed(1)
    w = torch.randn(64, 32)
    impl = cpu_linear.PackedLinear(w)
    small = cpu_linear.SKINNY_ROWS
    x = torch.randn(small + 1, 1, 32)  # megatron's [tokens, batch, hidden]
    assert torch.equal(impl(x[:small], w), op.skinny_linear(x[:small, 0], w).view(small, 1, 64))
    onednn = torch.ops.mkldnn._linear_pointwise(x, impl.packed, None, "none", [], "")
    assert torch.equal(impl(x, w), onednn)
    monkeypatch.setattr(cpu_linear, "_SKINNY", [])
    monkeypatch.setenv("SEESAW_SKINNY_LINEAR", "0")
    assert cpu_linear.skinny_linear_op() == (None, "SEESAW_SKINNY_LINEAR=0")
    off = cpu_linear.PackedLinear(w)
    assert off.skinny is None
    assert torch.equal(off(x[:1], w), torch.ops.mkldnn._linear_pointwise(x[:1], off.packed, None, "none", [], ""))


def test_lazy_packing_waits_for_a_call_that_needs_the_packed_copy(monkeypatch):
    """A layout loaded by a switch packs lazily: calls at up to SKINNY_ROWS rows (skinny_linear)
    and from MKL_ROWS (MKL's sgemm) leave it unpacked; the first call between packs it, with the
    same numbers as a copy packed up front."""
    _skinny()
    torch.manual_seed(4)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(20, 32)
    monkeypatch.setattr(cpu_linear, "SKINNY_ROWS", 4)
    monkeypatch.setattr(cpu_linear, "MKL_ROWS", 16)
    eager, lazy = cpu_linear.PackedLinear(w), cpu_linear.PackedLinear(w, lazy=True)
    assert eager.packed is not None and lazy.packed is None
    for m in (1, 4, 16, 20):
        assert torch.equal(lazy(x[:m], w, b), eager(x[:m], w, b)), m
        assert lazy.packed is None, m
    assert torch.equal(lazy(x[:9], w, b), eager(x[:9], w, b))
    assert lazy.packed is not None
    assert torch.equal(lazy(x[:9], w, b), eager(x[:9], w, b))


def test_another_weight_takes_the_plain_matmul():
    w = torch.randn(16, 8)
    other = torch.randn(16, 8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(cpu_linear.PackedLinear(w)(x, other), x @ other.t())


def test_choice_is_logged_once_and_torch_opts_out(caplog):
    cpu_linear._CHOICE.clear()
    with caplog.at_level(logging.INFO, logger="seesaw_mc"):
        assert cpu_linear.select_linear("auto", torch.device("cpu"), torch.float32) == cpu_linear.ONEDNN
        assert cpu_linear.select_linear("auto", torch.device("cpu"), torch.float32) == cpu_linear.ONEDNN
        assert cpu_linear.select_linear("torch", torch.device("cpu"), torch.float32) == cpu_linear.TORCH
    op, why = cpu_linear.skinny_linear_op()
    few = "skinny_linear" if op is not None else f"onednn ({why})"
    small = cpu_linear.SKINNY_ROWS
    many = f"; from {cpu_linear.MKL_ROWS} rows: torch (MKL)" if cpu_linear.MKL_ROWS else ""
    assert [r.getMessage() for r in caplog.records] == [f"linear layers: onednn; up to {small} rows: {few}{many}",
                                                         "linear layers: torch (--kernels torch)"]
    assert cpu_linear._unavailable("auto", torch.device("cuda", 0), torch.float32).startswith("oneDNN packing")


def _packed(model):
    return [type(m.__dict__.get("_forward_impl")).__name__ for m in cpu_linear._linears(model)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_engine_packs_its_linears_and_matches_hf(tiny_models, family):
    """gpt2: tied output layer (packed from the embedding), biases in every linear."""
    path = tiny_models[family]
    prompts = [[5, 9, 17, 33, 2, 8][: n] * 3 for n in (1, 2, 6)] + [list(range(10, 70))]
    want = hf_greedy(path, prompts, 16)
    for kernels, expect in (("auto", "PackedLinear"), ("torch", "NoneType")):
        llm = LLM(path, dtype="float32", kernels=kernels)
        model = llm.engine.runner.models["prefill"]
        assert set(_packed(model)) == {expect}
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=16),
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, kernels


def test_released_weights_drop_their_packed_copies(tiny_models):
    from seesaw_mc.worker.reshard import release_weights

    llm = LLM(tiny_models["llama"], dtype="float32")
    model = llm.engine.runner.models["prefill"]
    assert "PackedLinear" in _packed(model)
    release_weights(model)
    assert set(_packed(model)) == {"NoneType"}


def test_skinny_bound_follows_the_vector_width(monkeypatch):
    """Up to 12 rows on AVX2 (skinny_linear 8 floats wide), 24 where its AVX-512 tiles run."""
    monkeypatch.delenv("SEESAW_SKINNY_ROWS", raising=False)
    for isa, rows in (("AVX2", 12), ("AVX512", 24), ("DEFAULT", 12)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert cpu_linear._skinny_rows() == rows, isa
    monkeypatch.setenv("SEESAW_SKINNY_ROWS", "7")
    assert cpu_linear._skinny_rows() == 7


def test_one_row_takes_mkl_gemv_where_chosen(monkeypatch):
    """Intel: one row goes to torch.mv on the unpacked weight (MKL's gemv reads it faster there);
    elsewhere to skinny_linear. Both near the fp64 product; a TP shard's strided rows included."""
    op = _skinny()
    torch.manual_seed(2)
    full = torch.randn(64, 40)
    w = full[:, 4:36]  # rows apart in memory, as a row-parallel shard
    x = torch.randn(1, 1, 32)
    ref = (x[0].double() @ w.double().t()).float()
    impl = cpu_linear.PackedLinear(w)
    monkeypatch.setattr(cpu_linear, "ONE_ROW_GEMV", True)
    got = impl(x, w)
    assert got.shape == (1, 1, 64) and torch.equal(got[0, 0], torch.mv(w, x[0, 0]))
    torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(cpu_linear, "ONE_ROW_GEMV", False)
    assert torch.equal(impl(x, w)[0], op.skinny_linear(x[0], w))
    for value, want in (("1", True), ("0", False)):
        monkeypatch.setenv("SEESAW_ONE_ROW_GEMV", value)
        assert cpu_linear._one_row_gemv() is want


def test_many_rows_take_mkl_sgemm_where_chosen(monkeypatch):
    """Intel: from MKL_ROWS rows on, torch's matmul on the unpacked weight (MKL's sgemm is the
    faster there at prefill sizes); below it oneDNN's packed GEMM; MKL_ROWS 0: never."""
    torch.manual_seed(3)
    full = torch.randn(48, 40)
    w = full[:, 4:36]  # a row-parallel shard: rows apart in memory
    x = torch.randn(12, 1, 32)
    impl = cpu_linear.PackedLinear(w)
    monkeypatch.setattr(cpu_linear, "SKINNY_ROWS", 2)
    monkeypatch.setattr(cpu_linear, "MKL_ROWS", 8)
    onednn = torch.ops.mkldnn._linear_pointwise(x, impl.packed, None, "none", [], "")
    assert torch.equal(impl(x, w), torch.matmul(x, w.t()))
    assert torch.equal(impl(x[:7], w), onednn[:7])
    torch.testing.assert_close(impl(x, w), onednn, atol=2e-5, rtol=1e-5)
    monkeypatch.setattr(cpu_linear, "MKL_ROWS", 0)
    assert torch.equal(impl(x, w), onednn)
    monkeypatch.setenv("SEESAW_MKL_ROWS", "0")
    assert cpu_linear._mkl_rows() == 0
    monkeypatch.setenv("SEESAW_MKL_ROWS", "512")
    assert cpu_linear._mkl_rows() == 512
