"""DP replicas with very uneven work (issue 15 item 5) and the output file they write
together (issue 15 item 6)."""
import json
import random

import pytest
import torch.distributed as dist

from seesaw_mc.errors import RankFailure
from seesaw_mc.parallel import work_queue
from seesaw_mc.parallel.work_queue import WorkQueue

from test_batch_jobs import lines_by_id, prompts
from test_cli import run_cli, write_jsonl

pytestmark = pytest.mark.slow


def uneven_rows(n=12, long_tokens=480, seed=5):
    """Every other request is long: a round-robin split gives all of them to replica 1."""
    rng = random.Random(seed)
    return [{"id": i, "prompt_token_ids": [rng.randrange(3, 317) for _ in range(rng.randint(3, 8))],
             "max_tokens": 2 if i % 2 == 0 else long_tokens} for i in range(n)]


def test_work_queue_hands_each_request_out_once():
    """Issue 15 item 5: two leaders taking from one store, interleaved: every request exactly
    once, chunks never above what was asked nor above a fair share of what is left."""
    store = dist.HashStore()
    queues = [WorkQueue(store, 0, 23, 2, r, timeout_s=60) for r in range(2)]
    got, sizes = [], []
    while not all(q.exhausted for q in queues):
        for q in queues:
            r = q.take(8)
            got += list(r)
            sizes.append(len(r))
    assert sorted(got) == list(range(23))
    assert sizes[:4] == [8, 8, 4, 2]  # 23 left: 8; 15 left: 8; 7 left: 4; 3 left: 2 ...
    assert WorkQueue(store, 1, 5, 2, 0, timeout_s=60).take(3) == range(0, 3)  # a new run starts afresh


def test_work_queue_reports_a_replica_that_stopped(monkeypatch):
    """Issue 15 item 5: a leader that is done waits for the others by polling, and stops with
    RankFailure (exit 4) once another replica's heartbeat stood still for the timeout."""
    monkeypatch.setattr(work_queue, "POLL_S", 0.01)
    store = dist.HashStore()
    done, stuck = WorkQueue(store, 0, 2, 2, 0, timeout_s=0.3), WorkQueue(store, 0, 2, 2, 1, timeout_s=0.3)
    assert done.take(4) == range(0, 1) and stuck.take(4) == range(1, 2)
    stuck.beat(force=True)  # ... and never again
    calls = []
    with pytest.raises(RankFailure, match="DP replica 1 made no progress"):
        done.finish(keepalive=lambda: calls.append(1))
    assert len(calls) > 5  # the replica's other ranks were kept informed while it waited
    stuck.finish(keepalive=lambda: None)  # both done: returns at once


def test_uneven_replicas_finish_together(tiny_models, tmp_path):
    """Issue 15 item 5: two replicas (dp2, one rank each) and requests of very different
    lengths, with a collective timeout far below the work of the longest replica under a
    static split (6 x 480 tokens, about 9 s here, against 5 s). Requests are handed out as
    the replicas run, so neither waits on the other in a collective: the job succeeds, with
    the same lines as one rank (main: exit 4, "no progress for 5 s"); the replicas' files are
    merged in input order (item 6), so the bytes equal one rank's."""
    model = tiny_models["mistral"]  # the smallest: 2 layers
    inp = write_jsonl(tmp_path / "in.jsonl", uneven_rows())
    one = tmp_path / "one.jsonl"
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(one), "--ignore-eos", "--no-tqdm")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "dp2.jsonl"
    # --max-num-seqs 1: requests run one after another, so the imbalance is the whole work.
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(out), "--ignore-eos", "--no-tqdm",
                "--nproc-per-node", "2", "--layouts", "dp2", "--max-num-seqs", "1", "--collective-timeout", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert lines_by_id(out) == lines_by_id(one)
    assert [json.loads(ln)["id"] for ln in out.read_text().splitlines()] == list(range(12))
    assert out.read_bytes() == one.read_bytes() and not list(tmp_path.glob("dp2.jsonl.*"))


def test_resume_drops_torn_lines_anywhere(tiny_models, tmp_path):
    """Issue 15 item 6: what a killed dp2 job can leave on NFS: the output (replica 0) with a
    torn line in the middle (a cut record followed by another on the same line), a run of
    zeros and a torn last line, and replica 1's part file with a torn last line. --resume
    (on one rank) drops every torn line, re-runs exactly the requests with no complete line
    (a complete line is kept as it is: request 1's edited text survives), and leaves one line
    per input line, in input order, and no part file (main: "line 3 ... is not an output
    record of this tool")."""
    model = tiny_models["llama"]
    rows = [dict(r, id=i, max_tokens=8) for i, r in enumerate(prompts(12, seed=6))]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    full = tmp_path / "full.jsonl"
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(full), "--ignore-eos", "--no-tqdm")
    assert r.returncode == 0, r.stderr[-3000:]
    want = full.read_text().splitlines(keepends=True)
    assert [json.loads(ln)["id"] for ln in want] == list(range(12))  # the finished file: input order
    kept = json.loads(want[1])
    kept["text"] = "KEPT"
    kept = json.dumps(kept) + "\n"
    out = tmp_path / "out.jsonl"
    out.write_text(want[0] + want[2] + want[4][:25] + want[5] + kept + "\0" * 300 + "\n" + want[7] + want[9][:30])
    part = tmp_path / "out.jsonl.part-1"
    part.write_text(want[3] + want[6] + want[10] + want[11][:40])
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(out), "--ignore-eos", "--no-tqdm",
                "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    # Complete: 0 1 2 3 6 7 10. Torn: 4 (and 5, on its line), the zeros, 9, 11. Never written: 8.
    assert "resume: 7 of 12 requests already in" in r.stderr and "4 torn line(s) dropped" in r.stderr, r.stderr
    assert "(5 requests in" in r.stderr, r.stderr
    assert out.read_text().splitlines(keepends=True) == want[:1] + [kept] + want[2:]
    assert not part.exists() and not list(tmp_path.glob("out.jsonl.*"))
