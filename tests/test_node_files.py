"""Issue 15 item 3: files in shared memory are private (0600), never an existing file, and
those of a job killed during start-up are swept by the next one."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from seesaw_mc.errors import SeesawError
from seesaw_mc.worker import node_files
from seesaw_mc.worker.host_tier import HostKVBuffer
from seesaw_mc.worker.reshard import MasterWeights

SHAPE = HostKVBuffer.shape(1, 2, 2, 3, 4, 8)


def _write_weights(path):
    MasterWeights.write(path, [("w", torch.ones(4))], torch.float32)


def _write_kv(path):
    HostKVBuffer.open(path, SHAPE, torch.float32, 0, create=True)


@pytest.mark.parametrize("write", [_write_weights, _write_kv])
def test_shared_files_are_owner_only_and_exclusive(tmp_path, write):
    """Issue 15 item 3: the weights and the host KV tier are created 0600 (even under umask 0),
    and never over an existing file or through a planted symlink."""
    old = os.umask(0)
    try:
        write(str(tmp_path / "f"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == 0o600
    with pytest.raises(SeesawError, match="already exists") as e:
        write(str(tmp_path / "f"))
    assert "\n" not in str(e.value)
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(SeesawError, match="already exists"):
        write(str(tmp_path / "link"))
    assert target.read_bytes() == b"keep"


def _dead_owner():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.1)
        return node_files.owner_record(p.pid)
    finally:
        p.kill()
        p.wait()


def _job(d, job, owner, kinds=("weights-0", "weights-0.json", "kv-0")):
    names = [f"seesaw-{job}-{k}" for k in kinds]
    for n in names:
        (d / n).write_bytes(b"x")
    if owner is not None:
        (d / f"seesaw-{job}.0.owner").write_text(json.dumps(owner))
        names.append(f"seesaw-{job}.0.owner")
    return set(names)


def test_sweep_removes_only_files_of_dead_jobs(tmp_path):
    """Issue 15 item 3: a job whose marker names a dead process (a zombie too, or a reused
    pid) loses its files; live jobs, other containers' jobs, fresh unmarked files and other names stay."""
    dead = _job(tmp_path, "a" * 12, _dead_owner())
    reused = _job(tmp_path, "b" * 12, dict(node_files.owner_record(), start="1"))  # our pid, another start
    live = _job(tmp_path, "c" * 12, node_files.owner_record())
    elsewhere = _job(tmp_path, "d" * 12, dict(node_files.owner_record(), pidns="pid:[1]", pid=999999))
    torn = _job(tmp_path, "e" * 12, None, kinds=("weights-0",))
    (tmp_path / ("seesaw-" + "e" * 12 + ".0.owner")).write_text("{")  # written by a process killed mid-write
    old_unmarked = _job(tmp_path, "f" * 12, None, kinds=("kv-0",))
    os.utime(tmp_path / ("seesaw-" + "f" * 12 + "-kv-0"), (time.time() - 3600,) * 2)
    fresh_unmarked = _job(tmp_path, "1" * 12, None, kinds=("kv-0",))
    (tmp_path / "seesaw-explained-x").write_bytes(b"")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(0.1)
    zombie = _job(tmp_path, "9" * 12, node_files.owner_record(p.pid))
    p.kill()
    time.sleep(0.2)  # dead, not reaped yet: what a launcher's SIGKILLed rank looks like for a moment
    try:
        removed = set(node_files.sweep_stale(str(tmp_path)))
    finally:
        p.wait()
    assert removed == dead | reused | old_unmarked | zombie
    left = set(os.listdir(tmp_path))
    assert left == live | elsewhere | torn | {"seesaw-" + "e" * 12 + ".0.owner"} | fresh_unmarked | {"seesaw-explained-x"}


def test_claim_marks_the_job_as_alive(tmp_path):
    """Issue 15 item 3: the marker names this process, so a sweep keeps the job's files."""
    path = node_files.claim("2" * 12, 0, str(tmp_path))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert json.loads(open(path).read())["pid"] == os.getpid()
    _job(tmp_path, "2" * 12, None)
    assert node_files.sweep_stale(str(tmp_path)) == []
    with pytest.raises(SeesawError):
        node_files.claim("2" * 12, 0, str(tmp_path))


def test_engine_start_up_sweeps_a_killed_jobs_weights(tiny_models):
    """Issue 15 item 3: a start-up sweeps what a job SIGKILLed during its start-up left in
    shared memory (a full weight copy)."""
    from seesaw_mc import LLM

    d = node_files.shm_dir()
    import pathlib

    stale = _job(pathlib.Path(d), "3" * 12, _dead_owner())
    before = set(os.listdir(d))
    try:
        LLM(tiny_models["llama"])
        assert not stale & set(os.listdir(d))
        # The new job's files and its marker are gone once it has started: a kill leaves nothing.
        assert set(os.listdir(d)) <= before
    finally:
        for n in stale:
            node_files.unlink_quietly(os.path.join(d, n))


def test_two_nodes_on_one_host_each_mark_the_job(tmp_path):
    """Issue 15 item 3: two "nodes" of one job on one host (one /dev/shm) each keep their own
    marker; the job's files go only once every marker names a dead owner."""
    job = "4" * 12
    node_files.claim(job, 0, str(tmp_path))
    node_files.claim(job, 1, str(tmp_path))  # the same job id on the other node: no collision
    _job(tmp_path, job, None)
    (tmp_path / f"seesaw-{job}.1.owner").write_text(json.dumps(_dead_owner()))
    assert node_files.sweep_stale(str(tmp_path)) == []  # node 0's owner is alive
    (tmp_path / f"seesaw-{job}.0.owner").write_text(json.dumps(_dead_owner()))
    assert len(node_files.sweep_stale(str(tmp_path))) == 5
    assert os.listdir(tmp_path) == []
