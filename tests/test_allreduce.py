"""Tensor-parallel all-reduce backends: the choice (pure), DeepSpeed's shared-memory op under
torchrun with HF-identical greedy tokens, and the fallback to gloo when the op cannot build."""
import glob
import os

import pytest

from seesaw_mc.errors import ConfigError
from seesaw_mc.parallel.deepspeed_ops import choose_allreduce
from test_cli import run_cli
from test_layouts import check, torchrun


@pytest.mark.parametrize("requested,cuda,world,local,tps,expected", [
    ("auto", False, 2, 2, (1, 2), "deepspeed-shm"),  # P2->T2 on one host: decode TP spans the job
    ("auto", False, 2, 2, (2, 2), "deepspeed-shm"),
    ("auto", False, 4, 4, (2, 2), "gloo"),  # tp2pp2: TP groups are half the job, the op reduces over all
    ("auto", False, 4, 2, (4, 4), "gloo"),  # across hosts
    ("auto", False, 1, 1, (1, 1), "gloo"),
    ("auto", True, 2, 2, (2, 2), "nccl"),
    ("nccl", True, 8, 8, (8, 8), "nccl"),
    ("gloo", False, 2, 2, (2, 2), "gloo"),
    ("deepspeed-shm", False, 3, 3, (1, 3), "deepspeed-shm"),
])
def test_choose_allreduce(requested, cuda, world, local, tps, expected):
    assert choose_allreduce(requested, cuda, world, local, tps, cores=16) == expected


def test_auto_avoids_the_spinning_shm_op_on_too_few_cores():
    assert choose_allreduce("auto", False, 3, 3, (1, 3), cores=2) == "gloo"
    assert choose_allreduce("auto", False, 2, 2, (1, 2), cores=2) == "deepspeed-shm"
    assert choose_allreduce("deepspeed-shm", False, 3, 3, (1, 3), cores=2) == "deepspeed-shm"  # asked for


@pytest.mark.parametrize("requested,cuda,world,local,tps,fragment", [
    ("nccl", False, 2, 2, (2, 2), "needs CUDA"),
    ("deepspeed-shm", False, 4, 4, (2, 2), "needs a layout with tp == 4"),
    ("deepspeed-shm", False, 2, 1, (2, 2), "all ranks on one node"),
    ("deepspeed-shm", True, 2, 2, (2, 2), "on CUDA use nccl"),
    ("mpi", False, 2, 2, (2, 2), "must be one of"),
])
def test_choose_allreduce_rejects(requested, cuda, world, local, tps, fragment):
    with pytest.raises(ConfigError, match=fragment):
        choose_allreduce(requested, cuda, world, local, tps, cores=16)


def _segments():
    return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


@pytest.mark.slow
def test_deepspeed_shm_allreduce_matches_hf(tiny_models, tmp_path):
    """TP2 and P2->T2 with DeepSpeed's shm all-reduce: greedy tokens equal HF, the op really
    ran, and its /dev/shm segments are gone afterwards."""
    before = _segments()
    cases = []
    for family in ("llama", "qwen2"):
        m = tiny_models[family]
        cases += [{"name": f"{family} tp2", "model": m, "prefill": "tp2", "decode": "tp2", "max_tokens": 12,
                   "allreduce": "deepspeed-shm"},
                  {"name": f"{family} pp2->tp2", "model": m, "prefill": "pp2", "decode": "tp2", "max_tokens": 12,
                   "allreduce": "deepspeed-shm", "blocks": 24, "host_blocks": 30}]
    res = torchrun(2, {"cases": cases}, tmp_path)
    for family in ("llama", "qwen2"):
        part = {k: v for k, v in res.items() if k.startswith(family)}
        check(part, tiny_models[family], 12, {f"{family} pp2->tp2"})
    for name, r in res.items():
        assert r["allreduce"] == "deepspeed-shm", name
        assert r["shm_allreduce_calls"] > 0, name
    assert _segments() <= before, "DeepSpeed's shm segments were left in /dev/shm"


@pytest.mark.slow
def test_deepspeed_shm_falls_back_to_gloo_when_it_cannot_build(tiny_models, tmp_path):
    """No usable compiler and an empty extensions folder: one warning line, gloo, same tokens."""
    model = tiny_models["llama"]
    cases = [{"name": "tp2", "model": model, "prefill": "tp2", "decode": "tp2", "max_tokens": 12,
              "allreduce": "deepspeed-shm"}]
    err = []
    res = torchrun(2, {"cases": cases}, tmp_path, stderr=err,
                   env={"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    check(res, model, 12, set())
    assert res["tp2"]["allreduce"] == "gloo" and res["tp2"]["shm_allreduce_calls"] == 0
    warnings = [ln for ln in err[0].splitlines() if "shm all-reduce is unavailable" in ln]
    assert len(warnings) == 1, err[0][-3000:]


@pytest.mark.slow
def test_bad_allreduce_choice_is_one_line_on_every_rank(tiny_models, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "the quick brown fox", "max_tokens": 3}\n')
    for extra, fragment in ((["--allreduce", "nccl"], "needs CUDA"),
                            (["--layouts", "pp2", "--allreduce", "deepspeed-shm"], "needs a layout with tp == 2")):
        args = ["--layouts", "tp2"] + extra if "--layouts" not in extra else extra
        r = run_cli("generate", "--model", tiny_models["llama"], "--input", str(inp), "--output",
                    str(tmp_path / "out.jsonl"), "--nproc-per-node", "2", *args)
        assert r.returncode == 2, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert "Traceback" not in r.stderr
        assert lines and all(ln.startswith("seesaw-mc: error: ") and fragment in ln for ln in lines), r.stderr
