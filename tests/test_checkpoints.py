"""Megatron checkpoints made by megatron-core itself: a Llama-style model as torch_dist under
TP2PP2 and legacy mp_rank_* under TP2 and TP2PP2, and Megatron's classic GPT (LayerNorm, GELU,
biases, learned positions, tied) as legacy and torch_dist under TP2, converted and served in
several layouts; bad checkpoints fail with one line."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from test_cli import run_cli
from test_layouts import check, torchrun
from tiny_models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.slow


def megatron_worker(nproc, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, os.path.join(HERE, "megatron_worker.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(HERE, "megatron_worker.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]


def convert(*args):
    r = run_cli("convert", *args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An HF Llama (GQA 4/2, untied) -> torch_dist TP1 (our converter, through megatron-core's
    GPTModel) -> megatron-core reshards and saves it as torch_dist TP2PP2 and legacy TP2 and
    TP2PP2 -> each converted back to HF."""
    root = tmp_path_factory.mktemp("megatron")
    hf = build_model("llama", str(root / "hf"), layers=4, seed=11)
    p = {"hf": hf, "tp1": str(root / "tp1"), "dist22": str(root / "dist22"), "leg2": str(root / "leg2"),
         "leg22": str(root / "leg22"), "ref": str(root / "ref.pt")}
    convert("--input", hf, "--output", p["tp1"])
    megatron_worker(1, "logits", p["tp1"], p["ref"])
    megatron_worker(4, "dist+legacy", p["tp1"], p["dist22"], "2", "2", p["leg22"])  # one 4-rank launch
    megatron_worker(2, "legacy", p["tp1"], p["leg2"], "2")
    for name, tp, pp in (("dist22", 2, 2), ("leg2", 2, 1), ("leg22", 2, 2)):
        p[name + "_hf"] = str(root / (name + "_hf"))
        convert("--input", p[name], "--output", p[name + "_hf"], "--tokenizer", hf, "--tp", str(tp), "--pp", str(pp))
    return p


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    """Megatron's classic GPT, initialised by megatron-core under TP2 (with random biases and
    norms) and saved in both formats from the same model; megatron-core's own greedy tokens
    (TP1, resharded by dist_checkpointing); each checkpoint converted to an HF GPT-2 folder."""
    from tiny_models import build_tokenizer

    root = tmp_path_factory.mktemp("classic")
    p = {k: str(root / k) for k in ("leg", "dist", "tok", "leg_hf", "dist_hf")}
    p["ref"] = str(root / "ref.pt")
    build_tokenizer(p["tok"])
    megatron_worker(2, "classic", p["leg"], p["dist"])
    megatron_worker(1, "classic_greedy", p["dist"], p["ref"])
    convert("--input", p["leg"], "--output", p["leg_hf"], "--tokenizer", p["tok"], "--tp", "2")
    convert("--input", p["dist"], "--output", p["dist_hf"], "--tokenizer", p["tok"])
    return p


def test_classic_gpt_converts_to_gpt2(classic):
    """Both formats give the same HF GPT-2 folder: LayerNorm, erf GELU (Megatron's default, HF
    "gelu"), biases, 128 learned positions, tied, Megatron's padded vocabulary; MHA although the
    saved args carry num_query_groups=1 (it counts only with group_query_attention)."""
    import json

    from safetensors.torch import load_file

    a = load_file(os.path.join(classic["leg_hf"], "model.safetensors"))
    b = load_file(os.path.join(classic["dist_hf"], "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert a["transformer.wpe.weight"].shape == (128, 64) and "lm_head.weight" not in a
    assert a["transformer.h.0.attn.c_attn.bias"].abs().min() > 0  # the random biases came through
    cfg = json.load(open(os.path.join(classic["dist_hf"], "config.json")))
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["activation_function"] == "gelu"
    assert (cfg["n_head"], cfg["n_inner"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (4, 176, 512, True)


@pytest.mark.parametrize("name", ["leg_hf", "dist_hf"])
def test_classic_gpt_tokens_match_megatron_and_hf(classic, name):
    """Greedy tokens: megatron-core's forward == HF transformers on the converted folder == our
    engine; logits within 1e-5 of megatron-core's."""
    from transformers import AutoModelForCausalLM

    from seesaw_mc import LLM, SamplingParams
    from tiny_models import hf_greedy

    ref = torch.load(classic["ref"])
    path = classic[name]
    assert hf_greedy(path, ref["prompts"], 10) == ref["tokens"]
    outs = LLM(path).generate([{"prompt_token_ids": p} for p in ref["prompts"]],
                              SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref["tokens"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(ref["ids"]).logits - ref["logits"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_new_families_through_torch_dist_are_exact(tiny_models, tmp_path, family):
    """HF -> torch_dist (saved by megatron-core's GPTModel with LayerNorm, biases, learned positions
    and openai_gelu; or qk_layernorm and kv_channels) -> HF: bit-exact, config included."""
    import json

    from safetensors.torch import load_file

    src, dist, back = tiny_models[family], str(tmp_path / "dist"), str(tmp_path / "hf")
    convert("--input", src, "--output", dist)
    convert("--input", dist, "--output", back, "--tokenizer", src)
    a, b = (load_file(os.path.join(p, "model.safetensors")) for p in (src, back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    want, got = (json.load(open(os.path.join(p, "config.json"))) for p in (src, back))
    keys = ("architectures", "activation_function", "head_dim", "n_inner", "tie_word_embeddings", "vocab_size")
    assert {k: want.get(k) for k in keys} == {k: got.get(k) for k in keys}


def test_layouts_on_disk(ckpts):
    d = os.path.join(ckpts["dist22"], "iter_0000007")
    assert open(os.path.join(ckpts["dist22"], "latest_checkpointed_iteration.txt")).read().strip() == "7"
    assert os.path.exists(os.path.join(d, "metadata.json")) and os.path.exists(os.path.join(d, "common.pt"))
    assert sorted(os.listdir(os.path.join(ckpts["leg2"], "iter_0000003"))) == ["mp_rank_00", "mp_rank_01"]
    assert sorted(os.listdir(os.path.join(ckpts["leg22"], "iter_0000003"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]


@pytest.mark.parametrize("name", ["dist22_hf", "leg2_hf", "leg22_hf"])
def test_round_trip_is_exact(ckpts, name):
    from safetensors.torch import load_file

    a = load_file(os.path.join(ckpts["hf"], "model.safetensors"))
    b = load_file(os.path.join(ckpts[name], "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_logits_match_megatron_forward(ckpts):
    """megatron-core's own forward (GPTModel) vs HF transformers on the converted folder and
    vs our engine's logprobs, fp32."""
    from transformers import AutoModelForCausalLM

    from seesaw_mc import LLM, SamplingParams

    ref = torch.load(ckpts["ref"])
    ids, want = ref["ids"], ref["logits"].float()
    hf = AutoModelForCausalLM.from_pretrained(ckpts["dist22_hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    llm = LLM(ckpts["dist22_hf"])
    out = llm.generate([{"prompt_token_ids": ids[0].tolist()}], SamplingParams(temperature=0, max_tokens=1,
                                                                                 logprobs=20), use_tqdm=False)
    lps = out[0].outputs[0].logprobs[0]
    ref_lp = torch.log_softmax(want[0, -1], dim=-1)
    assert len(lps) >= 20
    for tid, lp in lps.items():
        assert abs(lp.logprob - ref_lp[tid].item()) <= 1e-5, tid


def test_converted_checkpoints_in_every_layout(ckpts, classic, tmp_path):
    """TP1 in-process is covered above; TP2, PP2 and P2->T2 under torchrun equal HF greedy, for
    the Llama-style and the classic GPT checkpoints, in one job."""
    models = {"llama": ckpts["dist22_hf"], "gpt": classic["dist_hf"]}
    cases = [{"name": f"{m}:{n}", "model": path, "prefill": p, "decode": d, "max_tokens": 10,
              "blocks": None if p == d else 24, "host_blocks": None if p == d else 30}
             for m, path in models.items()
             for n, p, d in (("tp2", "tp2", "tp2"), ("pp2", "pp2", "pp2"), ("pp2->tp2", "pp2", "tp2"))]
    res = torchrun(2, {"cases": cases}, tmp_path)
    for m, path in models.items():
        check({k.split(":", 1)[1]: v for k, v in res.items() if k.startswith(m + ":")}, path, 10, {"pp2->tp2"})


def _legacy_copy(ckpts, tmp_path, name="leg2"):
    dst = tmp_path / name
    shutil.copytree(ckpts[name], dst)
    return dst


def assert_one_line(r, fragment, code=3):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("seesaw-mc: error: ") and fragment in lines[0], r.stderr


def test_corrupt_shard(ckpts, tmp_path):
    d = _legacy_copy(ckpts, tmp_path)
    f = d / "iter_0000003" / "mp_rank_01" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    r = run_cli("convert", "--input", str(d), "--output", str(tmp_path / "out"))
    assert_one_line(r, "mp_rank_01/model_optim_rng.pt: corrupt, truncated")


def test_corrupt_distcp(ckpts, tmp_path):
    d = tmp_path / "dist"
    shutil.copytree(ckpts["dist22"], d)
    shard = sorted((d / "iter_0000007").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    r = run_cli("convert", "--input", str(d), "--output", str(tmp_path / "out"))
    assert_one_line(r, "cannot load the distributed checkpoint")


def test_missing_rank_folder(ckpts, tmp_path):
    d = _legacy_copy(ckpts, tmp_path, "leg22")
    shutil.rmtree(d / "iter_0000003" / "mp_rank_01_001")
    r = run_cli("convert", "--input", str(d), "--output", str(tmp_path / "out"))
    assert_one_line(r, "missing rank folder mp_rank_01_001 (saved args say TP 2 x PP 2)")


@pytest.mark.parametrize("flag,fragment", [(["--tp", "4"], "saved with TP 2, not --tp 4"),
                                           (["--pp", "2"], "saved with PP 1, not --pp 2")])
def test_wrong_tp_or_pp(ckpts, tmp_path, flag, fragment):
    r = run_cli("convert", "--input", ckpts["leg2"], "--output", str(tmp_path / "out"), *flag)
    assert_one_line(r, fragment)


def test_unsupported_moe_and_missing_layer(ckpts, tmp_path):
    import argparse

    torch.serialization.add_safe_globals([argparse.Namespace])
    d = _legacy_copy(ckpts, tmp_path)
    for rank in ("mp_rank_00", "mp_rank_01"):
        f = d / "iter_0000003" / rank / "model_optim_rng.pt"
        sd = torch.load(f, weights_only=False)
        sd["args"].num_experts = 8
        torch.save(sd, f)
    r = run_cli("convert", "--input", str(d), "--output", str(tmp_path / "out"))
    assert_one_line(r, "unsupported model: mixture of experts (8 experts)")
    d2 = _legacy_copy(ckpts, tmp_path / "b")
    for rank in ("mp_rank_00", "mp_rank_01"):
        f = d2 / "iter_0000003" / rank / "model_optim_rng.pt"
        sd = torch.load(f, weights_only=False)
        sd["model"] = {k: v for k, v in sd["model"].items() if not k.startswith("decoder.layers.3.")}
        torch.save(sd, f)
    r = run_cli("convert", "--input", str(d2), "--output", str(tmp_path / "out2"))
    assert_one_line(r, "the stages hold 3 layers, the saved args say 4 (missing layer)")


def test_serving_a_megatron_folder_says_convert_first(ckpts, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "the quick brown fox", "max_tokens": 3}\n')
    r = run_cli("generate", "--model", ckpts["leg2"], "--input", str(inp), "--output", str(tmp_path / "o.jsonl"))
    assert_one_line(r, "is a Megatron checkpoint (legacy); convert it first: seesaw-mc convert")


def _crafted_torch_dist(hf, root, payload: bytes):
    """A torch_dist folder whose common.pt is valid and whose `.metadata` is `payload`."""
    from seesaw_mc.checkpoints.megatron_args import args_namespace
    from seesaw_mc.model_spec import load_model_args

    d = root / "iter_0000001"
    d.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                     '"common_backend": "torch", "common_backend_version": 1}')
    torch.save({"args": args_namespace(load_model_args(hf)), "checkpoint_version": 3.0, "iteration": 1},
               d / "common.pt")
    (d / ".metadata").write_bytes(payload)
    return root


def _global_call(module, name, *args):
    """A pickle that calls module.name(*args) (STACK_GLOBAL, REDUCE): what a crafted file does."""
    def s(x):
        return b"\x8c" + bytes([len(x.encode())]) + x.encode()

    return b"\x80\x04" + s(module) + s(name) + b"\x93" + b"(" + b"".join(map(s, args)) + b"tR."


@pytest.mark.parametrize("module,name,mode", [("builtins", "open", ("w",)),
                                              # a dotted name reaches os through a module that imports it
                                              ("torch.distributed.checkpoint.filesystem", "os.mkdir", ())])
def test_crafted_metadata_is_refused(tiny_models, tmp_path, module, name, mode):
    """Issue 15 item 4: a torch_dist `.metadata` that would run code when unpickled is refused
    with one line, and its code never runs."""
    marker = tmp_path / "ran"
    payload = _global_call(module, name, str(marker), *mode)
    d = _crafted_torch_dist(tiny_models["llama"], tmp_path / "ckpt", payload)
    r = run_cli("convert", "--input", str(d), "--output", str(tmp_path / "out"))
    assert not marker.exists(), "the checkpoint's code ran"
    assert_one_line(r, f"would run {module}.{name} when unpickled")
    assert "--trust-checkpoint" in r.stderr


def test_checkpoint_pickles_leave_the_global_allow_list_alone(tiny_models, tmp_path):
    """Issue 15 item 4: reading a checkpoint's pickles must not widen torch's process-wide
    weights_only allow-list (torch.serialization.add_safe_globals), for us or our importers.
    In a fresh process: other tests here allow-list Namespace themselves."""
    d = _crafted_torch_dist(tiny_models["llama"], tmp_path / "ckpt", b"")
    code = ("import argparse, sys, torch\n"
            "from seesaw_mc.checkpoints.megatron_args import load_pt\n"
            "assert load_pt(sys.argv[1])['args'].num_layers == 5\n"
            "print(argparse.Namespace in torch.serialization.get_safe_globals())\n")
    r = subprocess.run([sys.executable, "-c", code, str(d / "iter_0000001" / "common.pt")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False", "argparse.Namespace is now allow-listed for the whole process"


def test_dcp_reads_metadata_through_the_allow_list_during_the_load(tmp_path):
    """Issue 15 item 4: while we load, torch DCP's own read of `.metadata` is restricted too,
    so a file swapped after the check cannot run code; outside the load, DCP is untouched."""
    from torch.distributed.checkpoint import FileSystemReader

    from seesaw_mc.checkpoints.dcp_metadata import RefusedGlobal, restricted_metadata_reads

    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(_global_call("builtins", "open", str(marker), "w"))
    with restricted_metadata_reads():
        with pytest.raises(RefusedGlobal, match="builtins.open"):
            FileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()
    import pickle

    from torch.distributed.checkpoint import filesystem
    assert filesystem.pickle is pickle
