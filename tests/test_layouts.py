"""Parallel layouts and Seesaw re-sharding, multi-process under torchrun (gloo, CPU).

Every layout must give greedy tokens identical to HF transformers, and seeded sampling must
give the same tokens in every layout."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seesaw_mc import LLM, SamplingParams
from tiny_models import hf_greedy

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow


def torchrun(nproc, spec, tmp_path, timeout=600, env=None, stderr=None):
    out = tmp_path / f"out{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(HERE, "dist_worker.py"), str(out), json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    if stderr is not None:
        stderr.append(r.stderr)
    return json.loads(out.read_text())


def single_rank_sampled(model, prompts):
    llm = LLM(model)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:4]],
                        [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=40 + i) for i in range(4)],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def check(results, model, max_tokens, seesaw_cases):
    first = next(iter(results.values()))
    ref = hf_greedy(model, first["prompts"], max_tokens)
    sampled = single_rank_sampled(model, first["prompts"])
    for name, r in results.items():
        assert r["prompts"] == first["prompts"]
        assert r["greedy"] == ref, f"{name}: greedy tokens differ from HF"
        assert r["sampled"] == sampled, f"{name}: seeded sampling differs from the single-rank engine"
        if name in seesaw_cases:
            # The small cache forces several prefill <-> decode rounds, i.e. transitions.
            assert len(r["transitions"]) >= 3, (name, r["transitions"])
            for t in r["transitions"]:
                assert {"weights_s", "kv_drain_s", "barrier_s"} <= set(t)
        else:
            assert r["transitions"] == []


def cases(model, pairs, max_tokens, blocks=24, host_blocks=30):
    # Small tiers (blocks of 4 tokens) force many prefill <-> decode rounds and preemptions.
    return [{"name": f"{p}->{d}", "model": model, "prefill": p, "decode": d, "max_tokens": max_tokens,
             "blocks": None if p == d else blocks, "host_blocks": None if p == d else host_blocks}
            for p, d in pairs]


def test_two_ranks(tiny_models, tmp_path):
    """tp2, pp2, P2->T2 and T2->P2 for Llama and Qwen2 (tied, QKV bias), both in one 2-rank job."""
    pairs = [("tp2", "tp2"), ("pp2", "pp2"), ("pp2", "tp2"), ("tp2", "pp2")]
    spec = [dict(c, name=f"{family}:{c['name']}")
            for family in ("llama", "qwen2") for c in cases(tiny_models[family], pairs, 12)]
    for c in spec:  # llama: pp steps in flight (the default); qwen2: the pipeline drains every step
        c["depth"] = 1 if c["name"].startswith("qwen2") else None
        if c["name"].startswith("llama"):  # prompts that share a prefix (issue 18), stored once: smaller tiers
            c["shared"] = True
            c["allreduce"] = "gloo"  # TP steps in lockstep pairs (tp_overlap); qwen2 keeps DeepSpeed's shm
            c["blocks"], c["host_blocks"] = (16, 20) if c["blocks"] else (None, None)
    all_res = torchrun(2, {"cases": spec, "probe_sends": True}, tmp_path)
    # Plans and activations leave without waiting for their receiver, and arrive in order.
    assert all_res.pop("probe_sends") == {"plans": [0, 1, 2], "activations": [[1.0], [2.0]]}
    for family in ("llama", "qwen2"):
        res = {k.split(":", 1)[1]: v for k, v in all_res.items() if k.startswith(family + ":")}
        check(res, tiny_models[family], 12, {"pp2->tp2", "tp2->pp2"})
        # The device tier is small too: decode overflows it and swaps sequences back to the host.
        assert res["pp2->tp2"]["preemptions"] > 0 and res["tp2->pp2"]["preemptions"] > 0, family
        # Decode refills the device tier in the background (prefetch) while resident sequences
        # compute; only the first swap-in of each decode phase is synchronous.
        for name in ("pp2->tp2", "tp2->pp2"):
            swap = res[name]["swap"]
            assert swap["prefetch_blocks"] > 0 and swap["offload_blocks"] > 0, (family, name, swap)
    # Linears packed for oneDNN at start-up; a switch's layout packs on first need, which decode at
    # up to SKINNY_ROWS rows (10 prompts here) never has where skinny_linear runs.
    from seesaw_mc.model import cpu_linear

    if cpu_linear._unavailable("auto", torch.device("cpu"), torch.float32) is None:
        for name, r in all_res.items():
            n, packed = r["decode_packed"]
            assert n > 0, name
            if name.endswith(("pp2->tp2", "tp2->pp2")) and cpu_linear.skinny_linear_op()[0] is not None:
                assert packed == 0, (name, r["decode_packed"])
            elif not name.endswith(("pp2->tp2", "tp2->pp2")):
                assert packed == n, (name, r["decode_packed"])
    # Over gloo, TP prefill steps ran as micro-batches in lockstep, pieces of one prompt included.
    for name in ("tp2->tp2", "tp2->pp2"):
        assert all_res[f"llama:{name}"]["lockstep_groups"] > 0, name
    for name in ("pp2->tp2", "pp2->pp2"):
        assert all_res[f"llama:{name}"]["lockstep_groups"] == 0, name
    # Shared prefixes were computed once per tier and stored once, in every layout.
    for name, r in all_res.items():
        if name.startswith("llama"):
            pc = r["prefix_cache"]
            assert pc["prefill_tokens_saved"] > 0 and pc["device_hit_blocks"] > 0, (name, pc)
            if name.endswith(("pp2->tp2", "tp2->pp2")):
                assert pc["host_hit_blocks"] > 0, (name, pc)


def test_host_tier_size_agreed_across_ranks(tiny_models, tmp_path):
    """Issue 15 item 1: ranks that read different MemAvailable still size the host tier alike.
    Local rank 0 makes the file in its shape, every rank views it in its own (HND strides
    depend on the block count), and the leader hands out block ids: all take the smallest
    count, and tokens still equal HF."""
    from seesaw_mc.model_spec import kv_bytes, load_model_args

    model = tiny_models["llama"]
    args = load_model_args(model)
    per_block = kv_bytes(args.num_layers, 4, args.num_kv_heads, args.head_dim, 4)  # fp32 on CPU, 4-token blocks
    # A quarter of MemAvailable (host_memory_fraction): 45 blocks for the leader, 30 for rank 1.
    mem = [int((n + 0.5) * per_block / 0.25) for n in (45, 30)]
    case = dict(cases(model, [("pp2", "tp2")], 12, host_blocks=None)[0], mem_available=mem)
    res = torchrun(2, {"cases": [case]}, tmp_path)
    assert res["pp2->tp2"]["host_blocks"] == 30
    check(res, model, 12, {"pp2->tp2"})


def logprob_gap(a, b):
    """Max |logprob difference| over the tokens both runs rank in their top-N, at every position
    up to the first greedy token where the runs part (after that they see other contexts);
    and how many positions were compared."""
    gap, n = 0.0, 0
    for ra, rb in zip(a, b):
        for ta, tb, pa, pb in zip(ra["tokens"], rb["tokens"], ra["top"], rb["top"]):
            gap = max([gap] + [abs(pa[t] - pb[t]) for t in pa.keys() & pb.keys()])
            n += 1
            if ta != tb:
                break
    return gap, n


def test_layout_logits_agree_on_a_default_initialised_model(tmp_path):
    """Issue 15 item 9: the tiny models use initializer_range 0.15, so their logits are peaked
    and a token-exact check never meets a near-tie. With the default 0.02 every logit is
    within a few hundredths of the others, and greedy tokens may legitimately part between
    layouts; what must agree is the logits. Max |logprob difference| of tp2, pp2 and P2->T2
    against 1 rank, fp32, over the top-5 of every position both runs reach with the same
    context. Bound: measured 4.8e-7 (tp2, pp2) and 9.5e-7 (P2->T2) over 118 positions: fp32
    rounding, a few ulps of logprobs near -5.8 (ulp 4.8e-7), since TP sums each matmul in
    another order. 1e-5 leaves 10x for other shapes and thread counts, and stays far below
    the logit gaps (~1e-2) of this model's top tokens."""
    from tiny_models import build_model
    from dist_worker import logprob_rows, prompts_for

    model = build_model("llama", str(tmp_path / "default-init"), layers=3, hidden=96, heads=4, kv_heads=2,
                        initializer_range=0.02, seed=3)
    prompts = [{"prompt_token_ids": p} for p in prompts_for(0, n=10)]
    ref = logprob_rows(LLM(model, block_size=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=5), use_tqdm=False))
    spec = {"cases": [dict(c, logprobs=5) for c in cases(model, [("tp2", "tp2"), ("pp2", "pp2"), ("pp2", "tp2")], 12)]}
    res = torchrun(2, spec, tmp_path)
    for name in ("tp2->tp2", "pp2->pp2", "pp2->tp2"):
        gap, n = logprob_gap(ref, res[name + ":logprobs"])
        print(f"{name}: max |logprob difference| {gap:.2e} over {n} positions")
        assert n >= 30, (name, n)
        assert gap < 1e-5, (name, gap)


def test_two_ranks_gpt2_and_qwen3(tiny_models, tmp_path):
    """GPT-2 (LayerNorm, GELU, biases, learned positions on the first stage, tied) and Qwen3 (q/k
    norms, head_dim != hidden/heads): tp2, pp2, P2->T2 and T2->P2, both families in one job."""
    pairs = [("tp2", "tp2"), ("pp2", "pp2"), ("pp2", "tp2"), ("tp2", "pp2")]
    spec = {"cases": [dict(c, name=f"{family}:{c['name']}")
                      for family in ("gpt2", "qwen3") for c in cases(tiny_models[family], pairs, 12)]}
    res = torchrun(2, spec, tmp_path)
    for family in ("gpt2", "qwen3"):
        mine = {k.split(":", 1)[1]: v for k, v in res.items() if k.startswith(family + ":")}
        check(mine, tiny_models[family], 12, {"pp2->tp2", "tp2->pp2"})


def test_four_ranks(tiny_models, tmp_path):
    """tp2pp2 and P4->T2P2 for Llama and Qwen2, both families in one 4-rank job."""
    pairs = [("tp2pp2", "tp2pp2"), ("pp4", "tp2pp2")]
    spec = {"cases": [dict(c, name=f"{family}:{c['name']}")
                      for family in ("llama", "qwen2") for c in cases(tiny_models[family], pairs, 12)]}
    res = torchrun(4, spec, tmp_path)
    for family in ("llama", "qwen2"):
        mine = {k.split(":", 1)[1]: v for k, v in res.items() if k.startswith(family + ":")}
        check(mine, tiny_models[family], 12, {"pp4->tp2pp2"})


def test_smollm2_p3_to_t3(demo_model, tmp_path):
    spec = {"cases": [{"name": "P3->T3", "model": demo_model, "prefill": "pp3", "decode": "tp3", "max_tokens": 10,
                       "n": 6, "vocab": 49152, "blocks": 30, "host_blocks": 24}]}
    res = torchrun(3, spec, tmp_path)
    check(res, demo_model, 10, {"P3->T3"})


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "seesaw_mc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("nproc,layouts,fragment", [
    (2, "pp4", "need 4 ranks but 2 were launched"),
    (2, "tp4", "tp=4 must divide the model's 4 attention heads and 2 KV heads"),
    (2, "P2->T4", "uses 2 ranks but decode layout tp4pp1 uses 4"),
    (2, "tp2->pp3", "uses 2 ranks but decode layout"),
    (3, "tp3", "tp=3 must divide the model's 4 attention heads"),
    (2, "pp2->tp2", None),  # sanity: a good layout runs
])
def test_bad_layouts_fail_fast_on_every_rank(tiny_models, tmp_path, nproc, layouts, fragment):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "the quick brown fox", "max_tokens": 3}\n')
    r = run_cli("generate", "--model", tiny_models["llama"], "--input", str(inp), "--output",
                str(tmp_path / "out.jsonl"), "--layouts", layouts, "--nproc-per-node", str(nproc))
    if fragment is None:
        assert r.returncode == 0, r.stderr
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 1
        return
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert all(l.startswith("seesaw-mc: error: ") and fragment in l for l in lines), r.stderr
    assert 1 <= len(lines) <= nproc  # one line per rank that got that far


def test_pp_larger_than_layers(tiny_models, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "the quick brown fox", "max_tokens": 3}\n')
    r = run_cli("generate", "--model", tiny_models["mistral"], "--input", str(inp), "--output",
                str(tmp_path / "out.jsonl"), "--layouts", "pp3", "--nproc-per-node", "3")
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 3 and all("pp=3 exceeds the model's 2 layers" in l for l in lines), r.stderr


def test_data_parallel_replicas(tiny_models, tmp_path):
    """dp2: two replicas split the requests (static TP2 and Seesaw P2->T2 per replica)."""
    model = tiny_models["llama"]
    spec = {"cases": [{"name": "d2t2", "model": model, "prefill": "dp2tp2", "decode": "dp2tp2", "max_tokens": 12},
                      {"name": "D2P2->D2T2", "model": model, "prefill": "D2P2", "decode": "D2T2", "max_tokens": 12,
                       "blocks": 24, "host_blocks": 14}]}
    res = torchrun(4, spec, tmp_path)
    first = res["d2t2"]
    ref = hf_greedy(model, first["prompts"], 12)
    for name, r in res.items():
        assert r["greedy"] == ref, name
    assert len(res["D2P2->D2T2"]["transitions"]) >= 2


def test_torchrun_cli_seesaw_job(tiny_models, tmp_path):
    """`torchrun -m seesaw_mc generate --layouts P2->T2` writes the same lines as one rank."""
    model = tiny_models["qwen2"]
    inp = tmp_path / "in.jsonl"
    rows = [{"id": f"r{i}", "prompt": "the quick brown fox " * (i + 1), "max_tokens": 6} for i in range(6)]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "seesaw_mc", "generate", "--model", model, "--input", str(inp), "--output",
                        str(tmp_path / "seesaw.jsonl"), "--layouts", "P2->T2", "--num-device-blocks", "30", "--num-host-blocks", "30",
                        "--block-size", "4", "--metrics-json", str(tmp_path / "m.json"), "--timeline", str(tmp_path / "t.png")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_cli("generate", "--model", model, "--input", str(inp), "--output", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr
    a = {j["id"]: j for j in map(json.loads, (tmp_path / "seesaw.jsonl").read_text().splitlines())}
    b = {j["id"]: j for j in map(json.loads, (tmp_path / "one.jsonl").read_text().splitlines())}
    assert a.keys() == b.keys() and all(a[k]["token_ids"] == b[k]["token_ids"] for k in a)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["transitions"] and all(t["weights_s"] >= 0 for t in metrics["transitions"])
    assert metrics["swap"]["bytes_to_host"] > 0 and metrics["swap"]["bytes_from_host"] > 0
    assert metrics["timeline"] and {row[2] for row in metrics["timeline"]} == {"prefill", "decode"}


def test_make_demo_seesaw_job(demo_model):
    """What `make demo` runs: SmolLM2 answering chat prompts with P3->T3 on 3 ranks."""
    r = run_cli("make-demo", "--model-dir", demo_model, "--layouts", "P3->T3", "--nproc-per-node", "3",
                "--max-tokens", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Paris" in r.stdout and "Throughput:" in r.stdout
    assert "prefill tp1pp3, decode tp3pp1 on 3 rank(s); 1 transition(s)" in r.stdout
