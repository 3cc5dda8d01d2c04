"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-prefill or mid-transition: the job stops
within seconds with one line naming the rank and what to do, exit code 4, no process and no
/dev/shm file left behind; --resume then finishes it."""
import os
import subprocess
import sys
import time

import pytest

from test_batch_jobs import lines_by_id, prompts
from test_cli import write_jsonl

pytestmark = pytest.mark.slow


def run_job(model, inp, out, fault=None, extra=()):
    """-> (result, seconds from the fault to the job's exit, or None without a fault). Timed
    from the fault, not the start: a busy machine slows the model load, not the stop."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEESAW_FAULT", None)
    fired = os.path.join(os.path.dirname(str(out)), "fault-fired")
    if fault:
        env["SEESAW_FAULT"] = fault
        env["SEESAW_FAULT_FIRED_FILE"] = fired
    cmd = [sys.executable, "-m", "seesaw_mc", "generate", "--model", model, "--input", inp, "--output", str(out),
           "--layouts", "P2->T2", "--nproc-per-node", "2", "--ignore-eos", "--max-num-seqs", "4",
           "--num-host-blocks", "20", "--num-device-blocks", "16", "--block-size", "4", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if not fault:
        return r, None
    assert os.path.exists(fired), "the fault never fired"
    with open(fired) as f:
        return r, time.time() - float(f.read())


def error_lines(stderr):
    """stderr without the start-up warnings of the small KV tiers used here."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert all(ln.startswith(("seesaw-mc: error: ", "seesaw_mc: ")) for ln in lines), stderr
    return [ln for ln in lines if ln.startswith("seesaw-mc: error: ")]


def leftovers(out):
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    procs = [ln for ln in ps.splitlines() if str(out) in ln]
    shm = {n for n in os.listdir("/dev/shm") if n.startswith(("seesaw-", "deepspeed_allreduce"))}
    return procs, shm


@pytest.mark.parametrize("fault,rank", [("1:prefill:2", 1), ("0:prefill:3", 0), ("1:transition:1", 1)])
def test_dead_rank(tiny_models, tmp_path, fault, rank):
    """A killed rank stops the job within seconds of its death (Issue 15 item 8: timed from
    the fault, so that a slow start-up on a busy machine does not fail it)."""
    model = tiny_models["llama"]
    inp = write_jsonl(tmp_path / "in.jsonl", [dict(p, max_tokens=12) for p in prompts(30, seed=3)])
    out = tmp_path / "out.jsonl"
    _, shm_before = leftovers(out)
    r, took = run_job(model, inp, out, fault)
    assert r.returncode == 4, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert f"rank {rank}" in lines[0] and "--resume" in lines[0]
    # Issue 15 item 8: was `took < 60` from the start, model load included, which a busy
    # machine broke. From the fault on it is teardown only, and far below the collective
    # timeout (600 s), which is thus never waited for.
    assert took < 60, took
    procs, shm = leftovers(out)
    assert not procs, procs
    assert shm <= shm_before, shm - shm_before
    if fault == "1:transition:1":  # the same command with --resume finishes the job, each request once
        r, _ = run_job(model, inp, out, extra=["--resume"])
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(lines_by_id(out)) == 30


def test_hung_rank_stops_the_job_after_the_collective_timeout(tiny_models, tmp_path):
    """Issue 15 item 8: timed from the hang (5 s timeout + teardown), not from the start."""
    model = tiny_models["llama"]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(20, seed=4))
    out = tmp_path / "out.jsonl"
    r, took = run_job(model, inp, out, "1:prefill:2:hang", ["--collective-timeout", "5"])
    assert r.returncode == 4, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "no progress for 5 s (rank 1 (pid" in lines[0] and "is stopped" in lines[0], r.stderr
    assert took < 60, took
    assert not leftovers(out)[0]
