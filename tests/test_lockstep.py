"""forward_lockstep (EngineConfig.tp_overlap): micro-batches run a layer piece by piece in turn,
and give the hidden states one batch gives, pieces of one prompt in two micro-batches included.
One rank: the deferred all-reduces are no-ops there; test_layouts.py runs it over gloo TP2."""
import pytest
import torch

from seesaw_mc import LLM
from seesaw_mc.model.attention import prefill_metadata, set_attn_metadata
from seesaw_mc.model.lockstep import forward_lockstep


def _tables(lens, first_block, bs):
    out, b = [], first_block
    for n in lens:
        k = -(-n // bs)
        out.append(list(range(b, b + k)))
        b += k
    return out


@pytest.mark.parametrize("kernels", ["auto", "torch"])  # our fused ops, and plain torch
def test_lockstep_gives_what_one_batch_gives(tiny_models, kernels):
    llm = LLM(tiny_models["llama"], dtype="float32", kernels=kernels)
    model, bs = llm.engine.runner.models["prefill"], llm.engine.runner.block_size
    g = torch.Generator().manual_seed(0)
    lens = [23, 9, 40]
    ids = [torch.randint(3, 300, (n,), generator=g) for n in lens]
    try:
        set_attn_metadata(prefill_metadata(_tables(lens, 0, bs), lens, [0, 0, 0], bs, "cpu"))
        with torch.inference_mode():
            ref = model(torch.cat(ids))
        # Other blocks, so that the second piece of prompt 1 can only read what the first one wrote.
        t = _tables(lens, 8, bs)
        a = prefill_metadata(t[:2], [23, 4], [0, 0], bs, "cpu")
        b = prefill_metadata(t[1:], [5, 40], [4, 0], bs, "cpu")
        with torch.inference_mode():
            hs = forward_lockstep(model, torch.cat([ids[0], ids[1][:4], ids[1][4:], ids[2]]), None, [a, b])
    finally:
        set_attn_metadata(None)
    assert [h.shape[0] for h in hs] == [27, 45]
    assert (torch.cat(hs) - ref).abs().max().item() < 1e-5
