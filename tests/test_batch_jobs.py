"""Launchers users already use (deepspeed, torchrun multi-node) and batch jobs that survive a
SIGKILL (--resume)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_cli import run_cli, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n, seed=0):
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog paris london berlin model cache token".split()
    return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))),
             "max_tokens": rng.randint(4, 16)} for _ in range(n)]


def lines_by_id(path):
    out = {}
    for ln in open(path, encoding="utf-8").read().splitlines():
        rid = json.loads(ln)["id"]
        assert rid not in out, f"request {rid} written twice"
        out[rid] = ln
    return out


def test_deepspeed_launcher_runs_a_seesaw_job(tiny_models, tmp_path):
    model = tiny_models["llama"]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(6))
    ref = tmp_path / "ref.jsonl"
    assert run_cli("generate", "--model", model, "--input", inp, "--output", str(ref), "--ignore-eos").returncode == 0
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHON=sys.executable,
               DEEPSPEED=os.path.join(os.path.dirname(sys.executable), "deepspeed"))
    r = subprocess.run([os.path.join(ROOT, "launch", "deepspeed.sh"), "2", "--model", model, "--input", inp,
                        "--output", str(out), "--layouts", "P2->T2", "--ignore-eos", "--num-host-blocks", "12",
                        "--num-device-blocks", "16", "--block-size", "4", "--metrics-json", str(tmp_path / "m.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_by_id(out) == lines_by_id(ref)  # the same lines as the 1-rank run
    assert len(json.load(open(tmp_path / "m.json"))["transitions"]) >= 2


def test_torchrun_two_nodes_on_loopback(tiny_models, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous) of 2 ranks each: D2P2->D2T2, one DP
    replica per node, Seesaw switching inside each node."""
    model = tiny_models["llama"]
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(8, seed=1))
    ref = tmp_path / "ref.jsonl"
    assert run_cli("generate", "--model", model, "--input", inp, "--output", str(ref), "--ignore-eos").returncode == 0
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NNODES="2", NPROC="2",
               OMP_NUM_THREADS="1", PYTHON=sys.executable, RDZV_ID=f"test-{os.getpid()}")
    cmd = [os.path.join(ROOT, "launch", "torchrun_multinode.sh"), "--model", model, "--input", inp, "--output",
           str(out), "--layouts", "D2P2->D2T2", "--ignore-eos", "--num-host-blocks", "16",
           "--num-device-blocks", "16", "--block-size", "4"]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
              for _ in range(2)]
    errs = [a.communicate(timeout=300)[1] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(e[-2000:] for e in errs)
    assert lines_by_id(out) == lines_by_id(ref)


def _children(pid):
    out, todo = [], [pid]
    while todo:
        r = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True)
        kids = [int(x) for x in r.stdout.split()]
        out += kids
        todo += kids
    return out


def _shm():
    return {n for n in os.listdir("/dev/shm") if n.startswith(("seesaw-", "deepspeed_allreduce"))}


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_job(model, inp, out, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "seesaw_mc", "generate", "--model", model, "--input", inp, "--output", str(out),
           "--layouts", "P2->T2", "--nproc-per-node", "2", "--ignore-eos", "--max-num-seqs", "2",
           "--num-host-blocks", "24", "--num-device-blocks", "24", "--block-size", "4", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def test_resume_after_sigkill(tiny_models, tmp_path):
    """Kill a 2-rank P2->T2 job with SIGKILL mid-run (plus a torn last line), restart it with
    --resume: every request exactly once, every line (greedy and sampled) byte-identical to an
    uninterrupted run, which is itself identical to a 1-rank run."""
    model = tiny_models["llama"]
    rows = prompts(40, seed=2)
    for i, r in enumerate(rows):
        r["max_tokens"] = 24
        if i % 2:  # sampled, no seed of its own: the engine derives one from its seed and the id
            r["temperature"] = 0.9
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    full = tmp_path / "full.jsonl"
    p = _start_job(model, inp, full)
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    want = lines_by_id(full)
    assert len(want) == 40
    # Determinism across layouts: one rank, static layout, same lines (sampled ones included).
    one = tmp_path / "one.jsonl"
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(one), "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert lines_by_id(one) == want

    out = tmp_path / "out.jsonl"
    shm_before = _shm()
    p = _start_job(model, inp, out)
    deadline = time.time() + 240
    while time.time() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 5:
            break
        assert p.poll() is None, "the job finished before it could be killed"
        time.sleep(0.05)
    ranks = _children(p.pid)
    assert len(ranks) >= 2, ranks
    os.killpg(p.pid, signal.SIGKILL)  # the launcher only: torchrun's ranks live in sessions of their own
    p.wait()
    deadline = time.time() + 30  # ... and die with it
    while any(_alive(r) for r in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks), "ranks outlived their killed launcher"
    assert _shm() <= shm_before, "the killed job left files in /dev/shm"
    got = out.read_text().splitlines()
    assert 5 <= len(got) < 40, len(got)
    with open(out, "a") as f:  # as if killed in the middle of writing a line
        f.write('{"id": 40, "text": "torn')
    p = _start_job(model, inp, out, ["--resume"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert f"resume: {len(got)} of 40 requests already in" in err
    assert lines_by_id(out) == want


def test_throughput_benchmark_refuses_bad_input_in_one_line(tiny_models, capsys):
    """A bad layout is checked before any engine starts: one error line, exit 2. A bad model folder
    raises the engine's one-line ModelError."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import throughput
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    with pytest.raises(SystemExit) as e:
        throughput.main(["--model", tiny_models["llama"], "--backends", "seesaw", "--layouts", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("throughput.py: error: --layouts: invalid layout '1'"), err
    from seesaw_mc.errors import ModelError

    with pytest.raises(ModelError, match="does not exist"):  # the script's __main__ prints it as one line
        throughput.main(["--model", "/nonexistent", "--backends", "seesaw", "--num-prompts", "2"])


def test_throughput_benchmark_with_in_run_baselines(tiny_models, tmp_path):
    """benchmarks/throughput.py runs our engine, DeepSpeed AutoTP and HF generate on the same
    ranks and requests and writes vLLM's keys (a smoke test: speed is not asserted)."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", tiny_models["llama"],
                        "--dataset-name", "fixed", "--input-len", "24", "--output-len", "6", "--num-prompts", "6",
                        "--threads", "1", "--backends", "seesaw,ds-autotp,hf", "--layouts", "P2->T2",
                        "--output-json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [b["backend"] for b in res["results"]] == ["seesaw", "ds-autotp", "hf"]
    for key in ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second"):
        assert key in res
    assert res["num_requests"] == 6 and "ratio_vs_ds-autotp" in res and "ratio_vs_hf" in res
    assert "Throughput:" in r.stdout
