"""Linear layers through oneDNN with packed weights (model/cpu_linear.py): the same numbers as
torch's matmul within fp32 rounding, packed only while their layout's weights are loaded, and
the engine's greedy tokens still equal HF's with either path."""
import logging

import pytest
import torch
import torch.nn.functional as F

from seesaw_mc import LLM, SamplingParams
from seesaw_mc.model import cpu_linear
from tiny_models import hf_greedy

pytestmark = pytest.mark.skipif(cpu_linear._unavailable("auto", torch.device("cpu"), torch.float32) is not None,
                                reason="this torch cannot pack fp32 linears for oneDNN")


def test_packed_matches_matmul_and_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    w, b = torch.randn(300, 64), torch.randn(300)
    impl = cpu_linear.PackedLinear(w)
    x = torch.randn(40, 64)
    torch.testing.assert_close(impl(x, w, b), F.linear(x, w, b), atol=2e-5, rtol=1e-5)
    full = impl(x, w)
    for m in (1, 7, 33):
        assert torch.equal(impl(x[:m], w), full[:m])


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
    assert [r.getMessage() for r in caplog.records] == ["linear layers: onednn",
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
