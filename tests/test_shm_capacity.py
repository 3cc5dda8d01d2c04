"""Issue 15 item 2: shared memory that cannot surprise. The weights and the host KV tier go to
/dev/shm, which a container often caps at 64 MiB: a write past it fails with ENOSPC, a sparse
host tier's page fault past it dies with SIGBUS mid-run. These tests mount a small tmpfs
(root only) and point SEESAW_SHM_DIR at it."""
import contextlib
import os
import subprocess
import sys

import pytest

from tiny_models import hf_greedy
from test_layouts import cases, torchrun

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]


@contextlib.contextmanager
def small_tmpfs(path, size):
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def generate(model, tmp_path, shm, *extra):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "the quick brown fox", "max_tokens": 3}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", SEESAW_SHM_DIR=shm)
    return subprocess.run([sys.executable, "-m", "seesaw_mc", "generate", "--model", model, "--input", str(inp),
                           "--output", str(tmp_path / "out.jsonl"), "--layouts", "pp2->tp2",
                           "--nproc-per-node", "2", *extra],
                          capture_output=True, text=True, timeout=300, env=env)


def one_line_error(r, fragment):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines and all(ln.startswith("seesaw-mc: error: ") and fragment in ln for ln in lines), r.stderr
    assert "--shm-size" in lines[0] and "SEESAW_SHM_DIR" in lines[0]


def test_weights_that_do_not_fit_fail_in_one_line_on_every_rank(tiny_models, tmp_path):
    """Issue 15 item 2: the weights (~0.4 MiB here) against a 256 KiB tmpfs: before, local
    rank 0 died of ENOSPC while the other rank waited for it at a barrier."""
    with small_tmpfs(tmp_path / "shm", "256k") as shm:
        r = generate(tiny_models["llama"], tmp_path, shm)
        one_line_error(r, "the weights")
        assert os.listdir(shm) == []  # nothing left behind


def test_an_explicit_host_tier_that_does_not_fit_fails_before_a_sigbus(tiny_models, tmp_path):
    """Issue 15 item 2: 100,000 host blocks (~200 MiB) against 4 MiB: before, the sparse file
    was made and the run died of SIGBUS once prefill had written past 4 MiB."""
    with small_tmpfs(tmp_path / "shm", "4m") as shm:
        r = generate(tiny_models["llama"], tmp_path, shm, "--num-host-blocks", "100000")
        one_line_error(r, "the host KV tier")
        assert os.listdir(shm) == []


def test_the_default_host_tier_fits_the_free_space(tiny_models, tmp_path):
    """Issue 15 item 2: by default the host tier takes 25% of RAM (GiBs); with a 4 MiB tmpfs
    it must shrink to what is free, and the tokens still equal HF."""
    from seesaw_mc.model_spec import kv_bytes, load_model_args

    model = tiny_models["llama"]
    args = load_model_args(model)
    per_block = kv_bytes(args.num_layers, 4, args.num_kv_heads, args.head_dim, 4)
    with small_tmpfs(tmp_path / "shm", "4m") as shm:
        case = cases(model, [("pp2", "tp2")], 12, host_blocks=None)[0]
        res = torchrun(2, {"cases": [case]}, tmp_path, env={"SEESAW_SHM_DIR": shm})
        assert os.listdir(shm) == []
    n = res["pp2->tp2"]["host_blocks"]
    assert 100 < n and n * per_block <= 4 * 2**20 - 0.5 * 2**20  # the weights took ~0.4 MiB of it
    assert res["pp2->tp2"]["greedy"] == hf_greedy(model, res["pp2->tp2"]["prompts"], 12)
