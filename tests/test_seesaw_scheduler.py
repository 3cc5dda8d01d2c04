"""The transition-minimising scheduler over two KV tiers, with fake capacities (no torch)."""
import math
import random
from collections import deque

import pytest

from seesaw_mc.core.block_manager import BlockManager, blocks_needed
from seesaw_mc.core.scheduler import Phase, RunnerOutput
from seesaw_mc.core.seesaw_policy import SeesawScheduler
from seesaw_mc.core.sequence import Sequence, SequenceStatus


class P:
    greedy = True


def arxiv_like(n, seed=0, scale=1.0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = int(min(max(rng.lognormvariate(math.log(4000), 0.45), 1024), 12000) * scale)
        new = int(min(max(rng.gauss(200, 60), 50), 400) * scale)
        out.append((Sequence(i, 0, [1] * prompt, P(), seed=0), max(new, 1)))
    return out


def drive(sched, reqs, stats=None, depth=1):
    """Play the engine and the runner: schedule, run, hand the step's tokens back
    (update_from_output), with up to `depth` steps in flight (pipeline parallelism: a step's
    tokens come back after later steps were scheduled). Checks that only resident sequences
    are decoded (prefilled, swapped in before the step, or prefetched during an earlier step),
    and that no step touches a block that a background copy not yet waited for still uses."""
    max_new = {s.request_id: m for s, m in reqs}
    sched.stop_check = lambda s, tok: s.num_output_tokens >= max_new[s.request_id]
    finished, steps, phases = [], 0, []
    host_pairs_written = {}
    resident = set()
    copying = {}  # ticket -> device blocks of a background copy no step has waited for yet
    in_flight = deque()
    stats = stats if stats is not None else {}

    def collect():
        out = in_flight.popleft()
        done = sched.update_from_output(out, RunnerOutput([1] * len(out.seqs), [None] * len(out.seqs)))
        finished.extend(s.request_id for s in done)

    while sched.has_unfinished():
        steps += 1
        assert steps < 200000, "livelock"
        out = sched.schedule()
        for t in out.wait_for:
            copying.pop(t, None)
        if not (out.seqs or out.swap_in or out.swap_out or out.prefetch):
            assert in_flight, "nothing scheduled and nothing in flight"
            collect()
            continue
        phases.append(out.phase)
        flying = {s.seq_id for o in in_flight for s in o.seqs}
        assert not flying & {s.seq_id for s in out.seqs}, "scheduled again before its token is back"
        for seq, pairs in out.swap_out + out.offload:
            for d, h in pairs:
                host_pairs_written[h] = seq.seq_id
            resident.discard(seq.seq_id)
        for seq, pairs in out.swap_in + out.prefetch:  # the host blocks read back hold this sequence's KV
            assert all(host_pairs_written.get(h) == seq.seq_id for _, h in pairs)
        for seq, _ in out.swap_in:
            resident.add(seq.seq_id)
        busy = {b for s in out.seqs for b in s.block_table}
        busy |= {d for _, pairs in out.swap_in + out.swap_out for d, _ in pairs}
        for t, blocks in copying.items():
            assert not busy & blocks, f"a step uses blocks that copy {t} may still be copying"
        for seq, pairs in out.prefetch:
            assert seq not in out.seqs, "a prefetched sequence is decoded before its copy is done"
            assert not busy & {d for d, _ in pairs}, "prefetch writes into blocks the step uses"
        for ticket, kind in ((out.offload_ticket, "offload"), (out.prefetch_ticket, "prefetch")):
            if ticket is not None:
                copying[ticket] = {d for _, pairs in getattr(out, kind) for d, _ in pairs}
        if out.prefetch and out.seqs:
            stats["overlapped_prefetches"] = stats.get("overlapped_prefetches", 0) + len(out.prefetch)
        stats["sync_swap_in_steps"] = stats.get("sync_swap_in_steps", 0) + bool(out.swap_in)
        for s in out.seqs:
            assert s.status is SequenceStatus.RUNNING
            assert len(s.block_table) >= blocks_needed(len(s), sched.bm.block_size)
            if out.phase is Phase.DECODE:
                assert s.seq_id in resident, f"{s} decoded without its KV on the device"
        if out.phase is Phase.PREFILL:
            resident.update(s.seq_id for s in out.seqs)  # computed on the device; offloaded next
        for seq, _ in out.prefetch:  # the next step finds the copy done
            resident.add(seq.seq_id)
        in_flight.append(out)
        while len(in_flight) >= depth:
            collect()
    assert not in_flight and sched.steps_in_flight == 0
    return finished, phases


@pytest.mark.parametrize("depth", [1, 2])
def test_arxiv_trace_few_transitions_nothing_lost(depth):
    reqs = arxiv_like(500)
    bs = 16
    host = BlockManager(num_blocks=500_000 // bs, block_size=bs, table="host_block_table")
    device = BlockManager(num_blocks=60_000 // bs, block_size=bs)
    sched = SeesawScheduler(device, host, max_num_seqs=64, max_num_batched_tokens=16384, decode_watermark=0.25)
    for s, _ in reqs:
        sched.add(s)
    stats = {}
    finished, phases = drive(sched, reqs, stats, depth=depth)  # depth 2: P2->T2 prefill
    assert sorted(finished) == list(range(500))  # none lost, none duplicated
    # The device tier refills from the host tier behind compute: a synchronous swap-in only
    # starts each decode phase (nothing resident yet, nothing to hide it behind).
    assert stats["sync_swap_in_steps"] <= sched.num_transitions, stats
    assert stats["overlapped_prefetches"] > 100, stats
    total_prompt = sum(s.num_prompt_tokens for s, _ in reqs)
    bound = math.ceil(total_prompt / (host.num_blocks * bs)) + 1
    switches = sum(1 for a, b in zip(phases, phases[1:]) if a is Phase.PREFILL and b is Phase.DECODE)
    assert switches == sched.num_transitions
    assert sched.num_transitions <= bound, (sched.num_transitions, bound)
    assert host.num_free_blocks == host.num_blocks and device.num_free_blocks == device.num_blocks


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("device_blocks,host_blocks", [(40, 200), (40, 60), (200, 40)])
def test_small_tiers_preempt_and_finish_everything(device_blocks, host_blocks, depth):
    """Tiers far too small: swaps, recompute and preemption, but every request finishes once.
    depth > 1: steps in flight under pipeline parallelism (issue 14 item 4), prefill in a pp
    layout and decode in groups, as T2->P2 or P2->P2 would run."""
    rng = random.Random(device_blocks + host_blocks)
    reqs = [(Sequence(i, 0, [1] * rng.randint(1, 60), P(), seed=0), rng.randint(1, 40)) for i in range(80)]
    device = BlockManager(device_blocks, 4)
    host = BlockManager(host_blocks, 4, table="host_block_table")
    sched = SeesawScheduler(device, host, max_num_seqs=16, max_num_batched_tokens=128)
    sched.decode_groups = depth
    for s, _ in reqs:
        sched.add(s)
    finished, phases = drive(sched, reqs, depth=depth)
    assert sorted(finished) == list(range(80))
    assert sched.num_transitions >= 2
    assert host.num_free_blocks == host_blocks and device.num_free_blocks == device_blocks
    assert device.num_held_blocks == 0 and host.num_held_blocks == 0


def test_no_starvation_fifo_admission():
    """A long prompt at the head is not overtaken by short ones behind it, and every request
    gets its tokens (Issue 15 item 8: the second check was always true)."""
    device = BlockManager(100, 4)
    host = BlockManager(100, 4, table="host_block_table")
    sched = SeesawScheduler(device, host, max_num_seqs=8, max_num_batched_tokens=1000)
    long_one = Sequence("long", 0, [1] * 300, P(), seed=0)
    shorts = [Sequence(f"s{i}", 0, [1] * 10, P(), seed=0) for i in range(20)]
    for s in shorts[:15]:
        sched.add(s)
    sched.add(long_one)
    for s in shorts[15:]:
        sched.add(s)
    finished, _ = drive(sched, [(s, 5) for s in shorts + [long_one]])
    assert finished.index("long") < max(finished.index(f"s{i}") for i in range(15, 20))
    # Issue 15 item 8: this used to read `and max_new`, a non-empty dict, always true.
    assert len(finished) == 21 and all(s.num_output_tokens == 5 for s in shorts + [long_one])


def test_never_fitting_prompt_rejected():
    sched = SeesawScheduler(BlockManager(10, 4), BlockManager(5, 4, table="host_block_table"), 4, 100)
    with pytest.raises(ValueError, match="host tier"):
        sched.add(Sequence("x", 0, [1] * 30, P(), seed=0))


def test_small_device_tier_still_fills_the_host_tier():
    """A device tier much smaller than the host tier: prefill keeps going (waiting for the
    last step's offload to free its blocks) until the host tier is full, so transitions stay
    near ceil(prompt KV / host capacity) instead of one per device-tier fill."""
    rng = random.Random(3)
    reqs = [(Sequence(i, 0, [1] * rng.randint(300, 500), P(), seed=0), rng.randint(10, 30)) for i in range(80)]
    bs = 16
    host = BlockManager(512, bs, table="host_block_table")
    device = BlockManager(192, bs)
    sched = SeesawScheduler(device, host, max_num_seqs=256, max_num_batched_tokens=8192)
    for s, _ in reqs:
        sched.add(s)
    finished, phases = drive(sched, reqs)
    assert sorted(finished) == list(range(80))
    total_prompt = sum(s.num_prompt_tokens for s, _ in reqs)
    assert sched.num_transitions <= math.ceil(total_prompt / (host.num_blocks * bs)) + 1, sched.num_transitions
