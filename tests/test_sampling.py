"""Sampling: seeds, top-k/top-p/min-p, the sampled distribution, stops, logprobs, n > 1."""
import math
import random

import pytest
import torch

from seesaw_mc import LLM, SamplingParams
from seesaw_mc.sampling import Sampler, apply_filters


class FakeSeq:
    def __init__(self, params, seed, step):
        self.params, self.seed, self.num_output_tokens = params, seed, step


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"])


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 320) for _ in range(rng.randint(3, 30))]} for _ in range(n)]


def test_chi_square_temperature_follows_softmax():
    """Draws from the sampler match softmax(logits / T) on a 6-token vocab."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temp = 0.7
    expected = torch.softmax(logits[0] / temp, dim=-1)
    sampler = Sampler()
    params = SamplingParams(temperature=temp)
    n = 6000
    counts = torch.zeros(6)
    for i in range(n):
        tok, _ = sampler(logits, [FakeSeq(params, seed=i // 50, step=i % 50)])
        counts[tok[0]] += 1
    exp_counts = expected * n
    chi2 = (((counts - exp_counts) ** 2) / exp_counts).sum().item()
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001.
    assert chi2 < 20.5, (counts, exp_counts)


def test_filters_mask_the_right_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    one = torch.ones(1)
    z = torch.zeros(1, dtype=torch.long)
    p = apply_filters(logits, one, torch.tensor([2]), one, torch.zeros(1))
    assert torch.allclose(p, torch.tensor([[4 / 7, 3 / 7, 0, 0]]))
    p = apply_filters(logits, one, z, torch.tensor([0.65]), torch.zeros(1))  # 0.4 + 0.3 >= 0.65
    assert torch.allclose(p, torch.tensor([[4 / 7, 3 / 7, 0, 0]]))
    p = apply_filters(logits, one, z, one, torch.tensor([0.45]))  # keep p >= 0.18
    assert torch.allclose(p, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0]]))
    p = apply_filters(logits, one, z, torch.tensor([0.01]), torch.zeros(1))  # the top token always survives
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0]]))


def test_same_seed_same_tokens_across_batches(llm):
    ps = prompts(6, seed=1)
    sp = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=100 + i) for i in range(6)]
    a = llm.generate(ps, sp, use_tqdm=False)
    # Different batch composition and order: each request's tokens depend only on its seed.
    b = llm.generate(ps[::-1][:4], sp[::-1][:4], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in b] == [o.outputs[0].token_ids for o in a[::-1][:4]]
    c = llm.generate(ps, [s.clone(seed=s.seed + 1000) for s in sp], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in c] != [o.outputs[0].token_ids for o in a]


def test_top_k_1_equals_greedy(llm):
    ps = prompts(5, seed=2)
    greedy = llm.generate(ps, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    topk1 = llm.generate(ps, SamplingParams(temperature=1.3, top_k=1, max_tokens=10, seed=5), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in topk1] == [o.outputs[0].token_ids for o in greedy]


def test_n_greater_than_one(llm):
    out = llm.generate(prompts(1, seed=3), SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=9),
                       use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate(prompts(1, seed=3), SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=9),
                         use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_stop_strings_cut_text(llm):
    tok = llm.get_tokenizer()
    base = llm.generate(prompts(4, seed=4), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)
    for o in base:
        full = o.outputs[0].text
        if len(full) < 8:
            continue
        stop = full[4:7]
        cut = llm.generate([{"prompt_token_ids": o.prompt_token_ids}],
                           SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
        assert cut.finish_reason == "stop" and cut.stop_reason == stop
        assert cut.text == full[: full.index(stop)]
        assert stop not in cut.text
        kept = llm.generate([{"prompt_token_ids": o.prompt_token_ids}],
                            SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                           include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
        assert kept.text == full[: full.index(stop) + len(stop)]
        assert tok.decode(kept.token_ids).startswith(kept.text)
        break
    else:
        pytest.fail("no output long enough to test stop strings")


def test_stop_token_ids_and_max_tokens(llm):
    p = prompts(1, seed=5)
    free = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    target = free.token_ids[3]
    first = free.token_ids.index(target)
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == free.token_ids[: first + 1]


def test_logprobs_match_hf(llm, tiny_models):
    from transformers import AutoModelForCausalLM

    p = prompts(1, seed=6)[0]["prompt_token_ids"]
    out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=3, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = torch.log_softmax(hf(torch.tensor([p + out.token_ids])).logits[0].float(), dim=-1)
    assert len(out.logprobs) == 3
    total = 0.0
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = lp[len(p) - 1 + i]
        top = row.topk(3)
        assert list(entry)[:3] == top.indices.tolist()
        assert entry[tok].rank == 1  # greedy picks the top token
        for t, l in entry.items():
            assert math.isclose(l.logprob, row[t].item(), abs_tol=1e-4)
        total += row[tok].item()
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-3)


@pytest.mark.parametrize("field,value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                         ("min_p", 1.5), ("n", 0), ("max_tokens", 0), ("logprobs", -1),
                                         ("seed", "x"), ("stop", [""])])
def test_invalid_sampling_values_raise_valueerror(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_greedy_across_vocab_shards_picks_the_first_maximum():
    """TP greedy: each rank's (max, index) of its vocab shard -> the token argmax of the whole row."""
    import torch

    from seesaw_mc.model.decoder import first_max_of_shards

    rows = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 1.0, 5.0, 2.0], [1.0, 2.0, 4.0, 4.0], [-1.0, -1.0, -2.0, -3.0]])
    shards = rows.view(4, 2, 2).transpose(0, 1)  # 2 shards of 2 columns each: [shard, row, col]
    best, idx = shards.max(dim=-1)
    pairs = torch.stack([best.double(), (idx + torch.tensor([[0], [2]])).double()], dim=-1)
    assert first_max_of_shards(pairs).tolist() == rows.argmax(dim=-1).tolist() == [1, 0, 2, 0]
