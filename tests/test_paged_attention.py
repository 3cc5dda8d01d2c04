"""Paged attention against plain SDPA on K/V gathered out of the blocks (the outside reference).

Every kernel (the CPU op, FlexAttention eager on CPU, the gather fallback) must agree with it
for decode and prefill, with and without a cached prefix, on ragged lengths, GQA, and block
tables that are shuffled and non-contiguous. Measured max |diff| in fp32: about 1e-6 for the
op and 4e-7 for flex; the bound is 1e-5."""
import logging

import pytest
import torch
import torch.nn.functional as F

from seesaw_mc.model import attention as A
from seesaw_mc.model import paged_attn_ext, paged_flex

BS = 16
FP32_BOUND = 1e-5


@pytest.fixture(autouse=True)
def automatic_backend():
    A.set_attention_backend(None)
    yield
    A.set_attention_backend(None)
    A.set_attn_metadata(None)


def make_cache(num_blocks, kv_heads, dim, dtype=torch.float32, seed=0, head_major=False):
    """k, v indexed [block, offset, head, dim]; `head_major`: each block [head, offset, dim] in
    memory, as the engine's CPU cache is (DeviceKVBuffer.views)."""
    g = torch.Generator().manual_seed(seed)
    inner = (kv_heads, BS, dim) if head_major else (BS, kv_heads, dim)
    k, v = (torch.randn(num_blocks, *inner, generator=g).to(dtype) for _ in range(2))
    return (k.transpose(1, 2), v.transpose(1, 2)) if head_major else (k, v)


def shuffled_tables(lens, num_blocks, seed=0):
    """Each sequence gets blocks drawn from a random permutation: never contiguous, never sorted."""
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, at = [], 0
    for n in lens:
        k = -(-n // BS)
        tables.append(perm[at:at + k])
        at += k
    return tables


def reference(q, k_cache, v_cache, tables, query_lens, context_lens, scale):
    """SDPA per sequence over K/V gathered from its blocks, query j at position ctx - q_len + j."""
    outs, at = [], 0
    hkv, d = k_cache.shape[2:]
    for table, n, ctx in zip(tables, query_lens, context_lens):
        k = k_cache[table].reshape(-1, hkv, d)[:ctx].float().transpose(0, 1)
        v = v_cache[table].reshape(-1, hkv, d)[:ctx].float().transpose(0, 1)
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        o = F.scaled_dot_product_attention(q[at:at + n].float().transpose(0, 1), k, v, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        outs.append(o.transpose(0, 1))
        at += n
    return torch.cat(outs)


def run_step(backend, meta, q, k_new, v_new, k_cache, v_cache, scale):
    """The layer's call: write this step's K/V, attend. "flex" runs eagerly on CPU, compiled on CUDA."""
    A.set_attn_metadata(meta)
    if backend == "flex":
        A.write_kv(k_cache, v_cache, k_new, v_new, meta)
        return paged_flex.paged_attention(q, k_cache, v_cache, meta, scale, compiled=q.device.type == "cuda")
    A.set_attention_backend(backend)
    return A.paged_attention(q, k_new, v_new, k_cache, v_cache, scale)


def new_tokens(n, heads, kv_heads, dim, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads)]


# (backend, head-major blocks): flex reads token-major blocks only, the others either.
LAYOUTS = [("op", True), ("op", False), ("sdpa", True), ("sdpa", False), ("flex", False)]
# Lengths at block boundaries (15, 16, 17, 32, 33), a single token, and longer ones.
LENS = [1, 15, 16, 17, 32, 33, 100, 250]


@pytest.mark.parametrize("backend,head_major", LAYOUTS)
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 4, 64), (6, 2, 128), (4, 4, 32)])
def test_decode_matches_gathered_sdpa(backend, head_major, heads, kv_heads, dim):
    k_cache, v_cache = make_cache(64, kv_heads, dim, head_major=head_major)
    tables = shuffled_tables(LENS, 64)
    q, k, v = new_tokens(len(LENS), heads, kv_heads, dim)
    meta = A.decode_metadata(tables, LENS, BS, "cpu")
    out = run_step(backend, meta, q, k, v, k_cache, v_cache, 0.11)
    ref = reference(q, k_cache, v_cache, tables, [1] * len(LENS), LENS, 0.11)
    assert (out - ref).abs().max().item() < FP32_BOUND


@pytest.mark.parametrize("backend,head_major", LAYOUTS)
@pytest.mark.parametrize("cached", [False, True])
def test_prefill_matches_gathered_sdpa(backend, head_major, cached):
    """Packed prompts, short (the op's one call) and long (SDPA's loop); with a cached prefix,
    each sequence's first tokens are already in its blocks and only the rest are queries."""
    prompt = [3, 16, 17, 40, 64, 65, 130]
    num_cached = [0, 5, 16, 1, 31, 64, 70] if cached else [0] * len(prompt)
    query_lens = [p - c for p, c in zip(prompt, num_cached)]
    k_cache, v_cache = make_cache(48, 4, 64, head_major=head_major)
    tables = shuffled_tables(prompt, 48, seed=3)
    q, k, v = new_tokens(sum(query_lens), 8, 4, 64)
    meta = A.prefill_metadata(tables, query_lens, num_cached, BS, "cpu")
    assert meta.has_prefix == cached
    out = run_step(backend, meta, q, k, v, k_cache, v_cache, 0.125)
    ref = reference(q, k_cache, v_cache, tables, query_lens, prompt, 0.125)
    assert (out - ref).abs().max().item() < FP32_BOUND


@pytest.mark.parametrize("backend,head_major", LAYOUTS)
@pytest.mark.parametrize("decode", [True, False])
def test_shared_prefix_blocks(backend, head_major, decode):
    """Issue 18: sequences whose tables start with the same blocks (a shared prefix) each see
    them, and only their own blocks after them; a prefill may also reuse a prefix that another
    sequence of the same step writes."""
    k_cache, v_cache = make_cache(40, 4, 64, head_major=head_major)
    own = shuffled_tables([48, 40, 70, 20], 40, seed=5)
    tables = [own[0][:3]] + [own[0][:3] + t for t in own[1:]]  # 3 shared blocks, then their own
    lens = [48, 48 + 40, 48 + 70, 33]
    tables[3] = own[0][:2] + own[3]  # shares 2 of the 3
    if decode:
        query_lens, ctx = [1] * 4, lens
        meta = A.decode_metadata(tables, lens, BS, "cpu")
    else:
        query_lens, ctx = [48, 40, 70, 1], lens
        meta = A.prefill_metadata(tables, query_lens, [0, 48, 48, 32], BS, "cpu")
    q, k, v = new_tokens(sum(query_lens), 8, 4, 64)
    out = run_step(backend, meta, q, k, v, k_cache, v_cache, 0.125)
    ref = reference(q, k_cache, v_cache, tables, query_lens, ctx, 0.125)
    assert (out - ref).abs().max().item() < FP32_BOUND


@pytest.mark.parametrize("head_major", [True, False])
def test_write_kv_lands_in_its_slot(head_major):
    """Each token's K/V is found at [block, offset] of its slot, in either layout, and nothing
    else changes."""
    k_cache, v_cache = make_cache(6, 2, 8, head_major=head_major)
    before = k_cache.clone(), v_cache.clone()
    meta = A.prefill_metadata([[4, 1], [3]], [3, 2], [14, 0], BS, "cpu")  # slots 4:14, 4:15, 1:0; 3:0, 3:1
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    A.write_kv(k_cache, v_cache, k, v, meta)
    where = [(4, 14), (4, 15), (1, 0), (3, 0), (3, 1)]
    for i, (b, o) in enumerate(where):
        assert torch.equal(k_cache[b, o], k[i]) and torch.equal(v_cache[b, o], v[i])
        before[0][b, o], before[1][b, o] = k[i], v[i]
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_flex_refuses_head_major_blocks():
    k_cache, v_cache = make_cache(8, 2, 8, head_major=True)
    meta = A.decode_metadata([[1]], [3], BS, "cpu")
    with pytest.raises(ValueError, match="FlexAttention reads token-major KV blocks"):
        paged_flex.paged_attention(torch.randn(1, 4, 8), k_cache, v_cache, meta, 0.3, compiled=False)


def test_prefill_positions_and_slots_follow_the_prefix():
    meta = A.prefill_metadata([[7, 2], [5]], [3, 2], [15, 0], BS, "cpu")
    assert meta.positions.tolist() == [15, 16, 17, 0, 1]
    assert meta.slot_mapping.tolist() == [7 * BS + 15, 2 * BS, 2 * BS + 1, 5 * BS, 5 * BS + 1]
    assert meta.context_lens == [18, 2] and meta.logits_indices.tolist() == [2, 4]
    # A piece of a prompt that goes on in the next micro-batch takes no logits.
    assert A.prefill_metadata([[7, 2], [5]], [3, 2], [15, 0], BS, "cpu", sample=[False, True]).logits_indices.tolist() == [4]
    assert A.prefill_metadata([[7, 2]], [3], [15], BS, "cpu", sample=[False]).logits_indices.numel() == 0
    with pytest.raises(ValueError, match="needs more than 1 blocks"):
        A.prefill_metadata([[1]], [2], [15], BS, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_op_low_precision_accumulates_in_fp32(dtype):
    k_cache, v_cache = make_cache(40, 4, 64, dtype, head_major=True)
    tables = shuffled_tables(LENS, 40)
    q, k, v = new_tokens(len(LENS), 8, 4, 64, dtype)
    meta = A.decode_metadata(tables, LENS, BS, "cpu")
    out = run_step("op", meta, q, k, v, k_cache, v_cache, 0.125)
    ref = reference(q, k_cache, v_cache, tables, [1] * len(LENS), LENS, 0.125)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < 2e-2  # the output's own rounding


def test_flex_block_mask_covers_every_visible_slot():
    """Eager flex applies the mask_mod densely, so check the BlockMask's sparsity on its own:
    each visible (query, slot) pair lies in a tile the mask lists (the compiled kernels skip
    the others)."""
    prompt, num_cached = [20, 40, 9], [4, 33, 0]
    tables = shuffled_tables(prompt, 30, seed=5)
    meta = A.prefill_metadata(tables, [p - c for p, c in zip(prompt, num_cached)], num_cached, BS, "cpu")
    mask = paged_flex.build_block_mask(meta, 30)
    listed = mask.to_dense()[0, 0].repeat_interleave(paged_flex.CHUNK, 0).repeat_interleave(paged_flex.CHUNK, 1)
    q_len, slots = mask.seq_lengths
    rows = torch.arange(q_len)[:, None].expand(q_len, slots)
    cols = torch.arange(slots)[None, :].expand(q_len, slots)
    visible = mask.mask_mod(torch.zeros_like(rows), torch.zeros_like(rows), rows, cols)
    assert visible.sum() == sum(sum(range(c + 1, p + 1)) for p, c in zip(prompt, num_cached))
    assert not (visible & ~listed[:q_len, :slots]).any()


def test_fallback_when_the_op_cannot_build(monkeypatch, caplog):
    """No compiler: one warning, gather + SDPA, the same numbers, nothing raised."""
    monkeypatch.setattr(paged_attn_ext, "load_op", lambda: (None, "it did not build (no compiler)"))
    k_cache, v_cache = make_cache(64, 4, 64)
    tables = shuffled_tables(LENS, 64)
    q, k, v = new_tokens(len(LENS), 8, 4, 64)
    with caplog.at_level(logging.INFO, logger="seesaw_mc"):
        for _ in range(2):
            A.set_attn_metadata(A.decode_metadata(tables, LENS, BS, "cpu"))
            out = A.paged_attention(q, k, v, k_cache, v_cache, 0.125)
    assert A.attention_backend(torch.device("cpu"))[0] == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "paged attention: the CPU paged-attention op is unavailable (it did not build (no compiler)); "
        "using gather + SDPA"]
    ref = reference(q, k_cache, v_cache, tables, [1] * len(LENS), LENS, 0.125)
    assert (out - ref).abs().max().item() < FP32_BOUND


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        A.set_attention_backend("fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton flex path needs CUDA")
@pytest.mark.parametrize("cached", [False, True])
def test_cuda_flex_matches_gathered_sdpa(cached):
    """The GPU check: flex compiled to Triton, decode and prefill (with and without prefix)."""
    dev = torch.device("cuda")
    k_cache, v_cache = (t.to(dev) for t in make_cache(64, 4, 64))
    tables = shuffled_tables(LENS, 64)
    q, k, v = (t.to(dev) for t in new_tokens(len(LENS), 8, 4, 64))
    out = run_step("flex", A.decode_metadata(tables, LENS, BS, dev), q, k, v, k_cache, v_cache, 0.125)
    ref = reference(q, k_cache, v_cache, tables, [1] * len(LENS), LENS, 0.125)
    assert (out - ref).abs().max().item() < 1e-4  # TF32-free fp32 on GPU, different reduction order
    prompt = [3, 17, 64, 130]
    num_cached = [0, 5, 31, 70] if cached else [0] * 4
    ql = [p - c for p, c in zip(prompt, num_cached)]
    q, k, v = (t.to(dev) for t in new_tokens(sum(ql), 8, 4, 64))
    tables = shuffled_tables(prompt, 64, seed=3)
    meta = A.prefill_metadata(tables, ql, num_cached, BS, dev)
    out = run_step("flex", meta, q, k, v, k_cache, v_cache, 0.125)
    assert (out - reference(q, k_cache, v_cache, tables, ql, prompt, 0.125)).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def default_init_llama(tmp_path_factory):
    """A tiny Llama at transformers' default init (initializer_range 0.02): nearly flat logits,
    where greedy ties make tokens a weak check, so logprobs are compared instead."""
    import transformers as tf

    from tiny_models import build_tokenizer

    path = tmp_path_factory.mktemp("default_init")
    tok = build_tokenizer(str(path))
    cfg = tf.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    assert cfg.initializer_range == 0.02
    torch.manual_seed(11)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def test_default_init_model_logprobs_match_hf(default_init_llama):
    """Greedy with logprobs through the engine (the op on this host, over head-major KV blocks),
    then HF teacher-forced on the same tokens: every sampled token's logprob agrees and is HF's
    maximum."""
    from transformers import AutoModelForCausalLM

    from seesaw_mc import LLM, SamplingParams

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (5, 16, 17, 40, 70)]
    llm = LLM(default_init_llama, dtype="float32")
    k_cache = llm.engine.runner.kv_views["prefill"].layers[0][0]
    if paged_attn_ext.load_op()[0] is not None:  # the op reads head-major blocks: the CPU cache is so
        assert A.kv_head_major(k_cache.device, 16)
        assert k_cache.shape[1:] == (BS, 4, 16) and k_cache.stride()[1:] == (16, BS * 16, 1)  # head_dim 16
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(default_init_llama, dtype=torch.float32).eval()
    worst = 0.0
    for p, o in zip(prompts, outs):
        ids = o.outputs[0].token_ids
        with torch.inference_mode():
            logits = hf(torch.tensor([p + ids])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1)
        ours = torch.tensor([o.outputs[0].logprobs[i][t].logprob for i, t in enumerate(ids)])
        chosen = ref[torch.arange(len(ids)), torch.tensor(ids)]
        worst = max(worst, (ours - chosen).abs().max().item())
        assert (ref.max(-1).values - chosen).max().item() < 1e-4  # greedy: ours is HF's argmax (ties allowed)
    assert worst < 1e-4
