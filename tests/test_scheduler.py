"""Block manager and scheduler: pure Python, fake capacities, no torch."""
import random
import subprocess
import sys

import pytest

from seesaw_mc.core.block_manager import BlockManager, blocks_needed
from seesaw_mc.core.scheduler import Phase, RunnerOutput, Scheduler
from seesaw_mc.core.sequence import Sequence, SequenceStatus


class P:  # the scheduler only carries params around
    greedy = True


def seq(n, rid=None):
    return Sequence(rid, 0, list(range(n)), P(), seed=0)


def test_no_torch_import():
    code = ("import sys; import seesaw_mc.core.scheduler, seesaw_mc.core.seesaw_policy, seesaw_mc.core.step_plan, seesaw_mc.core.block_manager, seesaw_mc.core.prefix_order, seesaw_mc.config, "
            "seesaw_mc.inputs, seesaw_mc.sampling_params; "
            "bad = [m for m in ('torch', 'numpy', 'megatron') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_block_manager_allocate_append_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(5)
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    # 5 tokens in 2 blocks: the 6th..8th token fit, the 9th needs a new block.
    for n in (6, 7, 8):
        s.token_ids.append(0)
        assert len(s) == n and not bm.needs_new_block(s)
        bm.append_slot(s)
    s.token_ids.append(0)
    assert bm.needs_new_block(s)
    bm.append_slot(s)
    assert len(s.block_table) == 3
    assert bm.slot(s, 8) == s.block_table[2] * 4
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == []
    big = seq(17)
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError):
        bm.allocate(big)


def test_block_ids_unique_and_conserved():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=50, block_size=8)
    live = []
    for _ in range(500):
        if live and rng.random() < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            s = seq(rng.randint(1, 40))
            if bm.can_allocate(s):
                bm.allocate(s)
                live.append(s)
        owned = [b for s in live for b in s.block_table]
        assert len(owned) == len(set(owned))
        assert len(owned) + bm.num_free_blocks == 50


def drive(sched, max_new, depth=1):
    """Run the scheduler like the engine does, with up to `depth` steps in flight (pipeline
    parallelism: a step's tokens come back after the next steps were scheduled); return
    (finished order, phases)."""
    from collections import deque

    sched.stop_check = lambda s, tok: s.num_output_tokens >= max_new[s.request_id]
    finished, phases, in_flight = [], [], deque()

    def collect():
        out = in_flight.popleft()
        done = sched.update_from_output(out, RunnerOutput([1] * len(out.seqs), [None] * len(out.seqs)))
        finished.extend(s.request_id for s in done)

    for _ in range(100000):
        if not sched.has_unfinished():
            assert not in_flight and sched.steps_in_flight == 0
            return finished, phases
        out = sched.schedule()
        if not out.seqs:
            assert in_flight, "nothing scheduled and nothing in flight"
            collect()
            continue
        phases.append(out.phase)
        if out.phase is Phase.PREFILL:
            assert sum(len(s) for s in out.seqs) <= sched.max_num_batched_tokens or len(out.seqs) == 1
        flying = {s.seq_id for o in in_flight for s in o.seqs}
        flying_blocks = {b for o in in_flight for s in o.seqs for b in s.block_table}
        for s in out.seqs:
            assert s.status is SequenceStatus.RUNNING
            assert s.seq_id not in flying, "a sequence scheduled again before its token is back"
            need = blocks_needed(len(s), sched.bm.block_size)
            assert len(s.block_table) >= need  # every token it computes has a slot
            assert not flying_blocks & set(s.block_table), "blocks of a step in flight reused"
        in_flight.append(out)
        while len(in_flight) >= depth:
            collect()
    raise AssertionError("scheduler did not finish (livelock)")


@pytest.mark.parametrize("num_blocks", [8, 20, 200])
def test_every_request_finishes_once_under_pressure(num_blocks):
    rng = random.Random(num_blocks)
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=64)
    max_new = {}
    for i in range(60):
        n = rng.randint(1, 12)
        max_new[i] = rng.randint(1, num_blocks * 4 - n - 1 if num_blocks < 20 else 30)
        sched.add(seq(n, rid=i))
    finished, phases = drive(sched, max_new)
    assert sorted(finished) == list(range(60))  # none lost, none duplicated
    assert bm.num_free_blocks == num_blocks  # every block returned
    if num_blocks == 8:
        assert sched.num_preemptions > 0
    assert Phase.PREFILL in phases and Phase.DECODE in phases


@pytest.mark.parametrize("num_blocks,depth", [(8, 2), (20, 2), (200, 2), (20, 4), (200, 4)])
def test_steps_in_flight_under_pipeline_parallelism(num_blocks, depth):
    """Issue 14 item 4: with pp steps in flight, decode runs pp groups in turn; nothing is
    scheduled twice or evicted while its token is on the way, and nothing is lost."""
    rng = random.Random(num_blocks * depth)
    bm = BlockManager(num_blocks=num_blocks, block_size=4)
    sched = Scheduler(bm, max_num_seqs=16, max_num_batched_tokens=64)
    sched.decode_groups = depth
    max_new = {}
    for i in range(60):
        n = rng.randint(1, 12)
        max_new[i] = rng.randint(1, num_blocks * 4 - n - 1 if num_blocks < 20 else 30)
        sched.add(seq(n, rid=i))
    finished, phases = drive(sched, max_new, depth=depth)
    assert sorted(finished) == list(range(60))
    assert bm.num_free_blocks == num_blocks
    if num_blocks == 200:  # room for everyone: decode alternates between groups of ~1/depth
        decode_steps = phases.count(Phase.DECODE)
        assert decode_steps >= depth * 30 * 0.9, decode_steps


def test_preempted_sequence_requeues_at_head_and_keeps_output():
    bm = BlockManager(num_blocks=3, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100, watermark=0)
    a, b = seq(2, "a"), seq(2, "b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.phase is Phase.PREFILL and out.seqs == [a, b]
    sched.update_from_output(out, RunnerOutput([7, 8], [None, None]))
    out = sched.schedule()  # both need a 2nd block; only one is free -> b preempted
    assert out.phase is Phase.DECODE and out.seqs == [a] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and list(sched.waiting) == [b]
    assert b.token_ids == [0, 1, 8] and b.num_prompt_tokens == 2  # output kept, recomputed later


def test_prefill_budget_and_fifo():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=100, max_num_batched_tokens=10)
    seqs = [seq(4, i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == seqs[:2]  # 4 + 4 <= 10 < 12
    big = seq(40, "big")
    sched2 = Scheduler(BlockManager(100, 4), max_num_seqs=4, max_num_batched_tokens=10)
    sched2.add(big)
    assert sched2.schedule().seqs == [big]  # a long prompt is admitted alone


def test_max_num_seqs_bounds_running():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=1000)
    for i in range(5):
        sched.add(seq(2, i))
    out = sched.schedule()
    assert len(out.seqs) == 3
    sched.update_from_output(out, RunnerOutput([1] * 3, [None] * 3))
    out = sched.schedule()
    assert out.phase is Phase.DECODE and len(out.seqs) == 3


def test_never_fitting_sequence_rejected():
    sched = Scheduler(BlockManager(num_blocks=2, block_size=4), 4, 100)
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        sched.add(seq(8))


def test_blocks_under_a_copy_ticket_wait_for_it():
    """A block that a background copy still uses is not handed out until its ticket completes."""
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq(8), seq(8)
    bm.allocate(a)
    bm.allocate(b)
    held = list(a.block_table)
    bm.free(a, ticket=7)
    assert a.block_table == [] and bm.num_free_blocks == 0 and bm.num_held_blocks == 2
    with pytest.raises(RuntimeError):
        bm.allocate(seq(4))
    bm.complete(6)  # another ticket: nothing changes
    assert bm.num_free_blocks == 0
    bm.complete(7)
    assert bm.num_free_blocks == 2 and bm.num_held_blocks == 0
    c = seq(8)
    bm.allocate(c)
    assert sorted(c.block_table) == sorted(held)
