"""The network-namespace test bed: a 2-host Seesaw job (P2->T2, torchrun multi-node, c10d) over
a rate-limited link gives the same lines as one rank, and the namespaces are gone afterwards,
also after Ctrl-C. Skipped where namespaces cannot be made (not root)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from test_batch_jobs import lines_by_id, prompts
from test_cli import run_cli, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "testbed"))
import netns  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(netns.available() is not None,
                                                    reason=f"test bed: {netns.available()}")]


def namespaces(tag):
    return [ln for ln in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith(tag)]


def test_two_hosts_seesaw_job_over_a_slow_link(tiny_models, tmp_path):
    model = tiny_models["llama"]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6, seed=5))
    ref = tmp_path / "ref.jsonl"
    assert run_cli("generate", "--model", model, "--input", inp, "--output", str(ref), "--ignore-eos").returncode == 0
    out = tmp_path / "out.jsonl"
    cmd = ["env", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=1", os.path.join(ROOT, "launch", "torchrun_multinode.sh"),
           "--model", model, "--input", inp, "--output", str(out), "--layouts", "P2->T2", "--allreduce", "gloo",
           "--ignore-eos", "--num-host-blocks", "16", "--num-device-blocks", "24", "--block-size", "4"]
    tag = f"sswt{os.getpid() % 10000}"
    with netns.Testbed(2, rate_mbit=100, tag=tag) as tb:
        assert len(namespaces(tag)) == 3
        res = tb.run(cmd, master_port=29600 + os.getpid() % 300, timeout=240)
    assert all(r.returncode == 0 for r in res), "\n".join(r.stderr[-2000:] for r in res)
    assert lines_by_id(out) == lines_by_id(ref)
    assert namespaces(tag) == []


def test_teardown_on_ctrl_c():
    tag = f"sswc{os.getpid() % 10000}"
    p = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {os.path.join(ROOT, 'benchmarks', 'testbed')!r})
import netns
with netns.Testbed(2, rate_mbit=50, tag={tag!r}) as tb:
    print("up", flush=True)
    tb.run(["sh", "-c", "sleep 61 & sleep 60"])  # the background sleep outlives its shell
"""], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    assert len(namespaces(tag)) == 3
    time.sleep(0.5)
    sleepers = [pid for ns in namespaces(tag) for pid in
                subprocess.run(["ip", "netns", "pids", ns.split()[0]], capture_output=True, text=True).stdout.split()]
    assert sleepers
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    assert namespaces(tag) == []
    # what ran in the hosts went with them
    assert not any(alive(pid) for pid in sleepers)


def alive(pid: str) -> bool:
    """Running, or stopped: not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return False
