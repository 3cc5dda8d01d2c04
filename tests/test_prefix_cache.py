"""Prefix sharing in the block managers and both schedulers (pure Python, no torch).

A simulated runner keeps what every KV slot of both tiers holds (the token prefix whose KV it
is) and makes every copy the scheduler asks for, as late as the real runner may: a background
copy (offload, prefetch) reads its source only when a step waits for its ticket, or at a layout
switch, which drains them all. At a switch it also gives the pages of `release_host` back (their
slots read as nothing) and wipes the device tier (the other layout reads its memory
differently). Every read a step makes is checked: a shared block that held the wrong KV, a
block rewritten before a copy read it, or a released page still in use, fails here before it
could change a token.
"""
import random
from collections import deque

import pytest

from seesaw_mc.core.block_manager import BlockManager, blocks_needed
from seesaw_mc.core.scheduler import Phase, RunnerOutput, Scheduler
from seesaw_mc.core.seesaw_policy import SeesawScheduler
from seesaw_mc.core.sequence import Sequence


class P:
    greedy = True


def kv(tokens, pos):
    """What the KV at position pos is a function of: the tokens up to it."""
    return hash(tuple(tokens[:pos + 1]))


class SlotRunner:
    """The KV contents of both tiers, and the checks of every step's reads."""

    def __init__(self, sched, rng):
        self.sched, self.rng = sched, rng
        self.switching = isinstance(sched, SeesawScheduler)  # prefill and decode in two layouts
        self.bs = sched.bm.block_size
        self.device = {}
        self.host = {}
        self.phase = None
        self.reads = 0
        self.pending = {}  # ticket -> background copies not made yet

    def _copy(self, pairs, src, dst, to_device):
        for d, h in pairs:
            a, b = (h, d) if to_device else (d, h)
            for o in range(self.bs):
                dst[b * self.bs + o] = src.get(a * self.bs + o)

    def _check(self, seq, upto):
        for p in range(upto):
            slot = seq.block_table[p // self.bs] * self.bs + p % self.bs
            assert self.device.get(slot) == kv(seq.token_ids, p), f"{seq} reads wrong KV at position {p}"
        self.reads += upto

    def _write(self, seq, start, end):
        for p in range(start, end):
            self.device[seq.block_table[p // self.bs] * self.bs + p % self.bs] = kv(seq.token_ids, p)

    def _finish(self, ticket):
        for pairs, to_device in self.pending.pop(ticket, []):
            self._copy(pairs, *((self.host, self.device) if to_device else (self.device, self.host)), to_device)

    def run(self, out):
        for t in out.wait_for:
            self._finish(t)
        self._copy(out.copy_pairs("swap_out"), self.device, self.host, to_device=False)
        if out.seqs and out.phase is not self.phase:  # a layout switch: the device tier means something else
            if self.phase is not None and self.switching:
                for t in list(self.pending):  # the switch drains every copy first
                    self._finish(t)
                for first, n in out.release_host:
                    for slot in range(first * self.bs, (first + n) * self.bs):
                        self.host.pop(slot, None)
                self.device = {s: ("other layout", v) for s, v in self.device.items()}
            self.phase = out.phase
        self._copy(out.copy_pairs("swap_in"), self.host, self.device, to_device=True)
        if out.phase is Phase.PREFILL:
            for s in out.seqs:  # in batch order: a prefix computed earlier in the step is there
                self._check(s, s.num_cached_tokens)
                self._write(s, s.num_cached_tokens, len(s))
        else:
            for s in out.seqs:  # every read before any write: no sequence reads another's new slot
                self._check(s, len(s) - 1)
            for s in out.seqs:
                self._write(s, len(s) - 1, len(s))
        for kind, to_device in (("prefetch", True), ("offload", False)):
            ticket = getattr(out, f"{kind}_ticket")
            if ticket is not None:
                self.pending.setdefault(ticket, []).append((out.copy_pairs(kind), to_device))
        return RunnerOutput([self.rng.randrange(50) for _ in out.seqs], [None] * len(out.seqs))


def drive(sched, reqs, depth=1, seed=0):
    max_new = {s.request_id: m for s, m in reqs}
    sched.stop_check = lambda s, tok: s.num_output_tokens >= max_new[s.request_id]
    for s, _ in reqs:
        sched.add(s)
    runner = SlotRunner(sched, random.Random(seed))
    finished, in_flight, steps = [], deque(), 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 500000, "livelock"
        out = sched.schedule()
        if not (out.seqs or out.swap_in or out.swap_out or out.prefetch):
            assert in_flight, "nothing scheduled and nothing in flight"
            o, r = in_flight.popleft()
            finished += [s.request_id for s in sched.update_from_output(o, r)]
            continue
        in_flight.append((out, runner.run(out)))
        while len(in_flight) >= depth:
            o, r = in_flight.popleft()
            finished += [s.request_id for s in sched.update_from_output(o, r)]
    return finished, runner


def shared_prefix_requests(n, block_size, seed=0):
    """Prompts made of one of a few system prompts (some a block multiple long) and a suffix:
    some prompts end mid-block, some exactly at a block boundary, some inside another prompt."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(k)] for k in (3 * block_size, 5 * block_size + 2, 7, 2 * block_size)]
    reqs = []
    for i in range(n):
        sys_prompt = rng.choice(systems)
        cut = rng.random()
        if cut < 0.15:  # inside another prompt's prefix
            prompt = sys_prompt[:rng.randint(1, len(sys_prompt))]
        elif cut < 0.3:  # exactly at a block boundary
            prompt = sys_prompt + [rng.randrange(1000) for _ in range(-len(sys_prompt) % block_size or block_size)]
        else:
            prompt = sys_prompt + [rng.randrange(1000) for _ in range(rng.randint(1, 3 * block_size))]
        reqs.append((Sequence(i, 0, prompt, P(), seed=0), rng.randint(1, 3 * block_size)))
    return reqs


def assert_empty(*tiers):
    for bm in tiers:
        assert bm.num_free_blocks == bm.num_blocks and bm.num_held_blocks == 0, "a block leaked"
        assert not any(bm._ref), "a reference count leaked"


def test_blocks_shared_by_reference_and_released():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = Sequence(0, 0, list(range(10)), P(), seed=0)
    b = Sequence(1, 0, list(range(9)) + [99], P(), seed=0)
    assert bm.allocate(a) == 0 and len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.new_blocks_needed(b) == 1  # its first two blocks are a's
    assert bm.allocate(b) == 2 and b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks == 4 and bm.hit_blocks == 2
    bm.free(a)
    assert bm.num_free_blocks == 5  # the shared blocks stay with b
    bm.free(b)
    assert bm.num_free_blocks == 8
    # Freed but still cached: a prompt of the same first 8 tokens finds them ...
    c = Sequence(2, 0, list(range(8)) + [7, 7], P(), seed=0)
    assert bm.allocate(c) == 2
    bm.free(c)
    # ... until fresh blocks are needed: uncached free blocks go first, then the least recently freed.
    big = Sequence(3, 0, [5] * 32, P(), seed=0)
    bm.allocate(big)
    assert bm.num_cached_blocks == 8  # all of them big's now: the old prefix was evicted for it
    bm.free(big)
    assert bm.allocate(Sequence(4, 0, list(range(10)), P(), seed=0)) == 0
    assert bm.num_free_blocks == 5


def test_the_block_a_sequence_writes_next_is_its_own():
    """A prompt that is all cached, ending at a block boundary: its last block is computed
    again into a block of its own (the token after it is written there or after it)."""
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = Sequence(0, 0, list(range(8)), P(), seed=0)
    b = Sequence(1, 0, list(range(8)), P(), seed=0)
    bm.allocate(a)
    assert bm.allocate(b) == 1 and b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    short = Sequence(2, 0, list(range(3)), P(), seed=0)  # inside a's first block: nothing full to share
    assert bm.allocate(short) == 0 and short.block_table[0] != a.block_table[0]


def test_content_keys_are_exact_chains():
    """The same block of tokens after a different prefix is different KV; an evicted prefix's
    continuation never matches a new chain."""
    bm = BlockManager(num_blocks=6, block_size=2, enable_caching=True)
    a = Sequence(0, 0, [1, 2, 3, 4, 5], P(), seed=0)
    b = Sequence(1, 0, [9, 9, 3, 4, 5], P(), seed=0)
    bm.allocate(a)
    assert bm.allocate(b) == 0 and not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    filler = Sequence(2, 0, [7] * 12, P(), seed=0)  # evicts everything
    bm.allocate(filler)
    bm.free(filler)
    c = Sequence(3, 0, [1, 2, 3, 4, 5], P(), seed=0)
    assert bm.allocate(c) == 0


def test_cached_blocks_survive_a_copy_ticket_and_host_pages_are_kept():
    bm = BlockManager(num_blocks=4, block_size=2, table="host_block_table", enable_caching=True)
    a = Sequence(0, 0, [1, 2, 3], P(), seed=0)
    bm.allocate(a)
    bm.free(a, ticket=7)
    assert bm.num_free_blocks == 2 and bm.num_held_blocks == 2
    b = Sequence(1, 0, [1, 2, 8], P(), seed=0)
    assert bm.allocate(b) == 1  # shares the block the copy still writes: read only after it
    bm.complete(7)
    assert bm.num_free_blocks == 2
    assert (a_first := b.host_block_table[0]) not in [x for r in bm.free_runs() for x in range(r[0], r[0] + r[1])]
    bm.free(b)
    # The cached block's pages are not given back to the OS; the others are.
    released = [x for first, n in bm.free_runs() for x in range(first, first + n)]
    assert a_first not in released and len(released) == 3


@pytest.mark.parametrize("num_blocks,depth", [(12, 1), (40, 1), (400, 1), (40, 2)])
def test_single_tier_reads_only_correct_kv_and_ends_empty(num_blocks, depth):
    bs = 4
    bm = BlockManager(num_blocks, bs, enable_caching=True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.decode_groups = depth
    reqs = [(s, min(m, num_blocks * bs - len(s) - 1)) for s, m in shared_prefix_requests(400, bs, seed=num_blocks)]
    finished, runner = drive(sched, reqs, depth=depth)
    assert sorted(finished) == list(range(400))
    assert_empty(bm)
    assert sched.prefill_tokens_saved > 0 and bm.hit_blocks > 0 and runner.reads > 0
    if num_blocks == 12:
        assert sched.num_preemptions > 0


@pytest.mark.parametrize("device_blocks,host_blocks,depth", [(16, 30, 1), (40, 200, 1), (200, 60, 1), (40, 200, 2)])
def test_two_tiers_read_only_correct_kv_and_end_empty(device_blocks, host_blocks, depth):
    """Thousands of requests through prefill, offload, swap in and out, preemption and layout
    switches: every read is the right KV and both tiers end empty."""
    bs = 4
    dev = BlockManager(device_blocks, bs, enable_caching=True)
    host = BlockManager(host_blocks, bs, table="host_block_table", enable_caching=True)
    sched = SeesawScheduler(dev, host, max_num_seqs=8, max_num_batched_tokens=64)
    sched.decode_groups = depth
    limit = min(device_blocks, host_blocks) * bs
    reqs = [(s, max(1, min(m, limit - len(s) - 2))) for s, m in shared_prefix_requests(2000, bs, seed=device_blocks)]
    finished, runner = drive(sched, reqs, depth=depth)
    assert sorted(finished) == list(range(2000))
    assert_empty(dev, host)
    assert dev.hit_blocks > 0 and host.hit_blocks > 0 and sched.prefill_tokens_saved > 0
    assert sched.num_transitions > 1


def test_sharing_off_is_the_old_behaviour():
    bs = 4
    reqs = shared_prefix_requests(200, bs, seed=3)
    dev = BlockManager(40, bs)
    host = BlockManager(200, bs, table="host_block_table")
    sched = SeesawScheduler(dev, host, max_num_seqs=8, max_num_batched_tokens=64)
    finished, _ = drive(sched, reqs)
    assert sorted(finished) == list(range(200))
    assert dev.hit_blocks == host.hit_blocks == sched.prefill_tokens_saved == 0
    assert_empty(dev, host)


def test_host_tier_counts_unique_blocks():
    """Ten prompts that share a 12-block prefix fit a host tier that holds 22 blocks: the
    prefix is stored once."""
    bs = 4
    prefix = list(range(48))
    dev = BlockManager(64, bs, enable_caching=True)
    host = BlockManager(22, bs, table="host_block_table", enable_caching=True)
    sched = SeesawScheduler(dev, host, max_num_seqs=16, max_num_batched_tokens=4096)
    for i in range(10):
        sched.add(Sequence(i, 0, prefix + [100 + i], P(), seed=0))
    out = sched.schedule()
    assert out.phase is Phase.PREFILL and len(out.seqs) == 10
    assert host.num_free_blocks == 22 - 12 - 10
    assert sum(len(p) for _, p in out.offload) == 12 + 10  # the prefix is offloaded once
    assert out.num_tokens == 49 + 9 * 1  # the others compute only their last token


def test_prefix_order_groups_shared_prefixes_and_keeps_the_rest():
    from seesaw_mc.core.prefix_order import prefix_order

    a, b = [1, 2, 3, 4], [9, 9, 9, 9]
    prompts = [a + [5], [7], b + [1], a + [3, 3], [8, 8, 8, 8, 8], b + [0], a + [5, 1], [7]]
    order = prefix_order(prompts, block_size=4)
    assert sorted(order) == list(range(len(prompts)))
    # a's group at its first member's place, in token order; then b's; the loners in input order.
    assert order == [3, 0, 6, 1, 5, 2, 4, 7]
    assert prefix_order([[1, 2]] * 3, block_size=4) == [0, 1, 2]  # nothing a full block long: as given


def test_no_prefix_caching_flag():
    import argparse

    from seesaw_mc.engine_args import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--model", "m"]))["enable_prefix_caching"] is True
    assert engine_kwargs(p.parse_args(["--model", "m", "--no-prefix-caching"]))["enable_prefix_caching"] is False


def test_a_decode_phase_copies_a_shared_prefix_in_once():
    bs = 4
    prefix = list(range(48))  # 12 blocks
    dev = BlockManager(64, bs, enable_caching=True)
    host = BlockManager(64, bs, table="host_block_table", enable_caching=True)
    sched = SeesawScheduler(dev, host, max_num_seqs=16, max_num_batched_tokens=4096)
    seqs = [Sequence(i, 0, prefix + [100 + i], P(), seed=0) for i in range(10)]
    max_new = {i: 3 for i in range(10)}
    copied_in = []
    sched.stop_check = lambda s, tok: s.num_output_tokens >= max_new[s.request_id]
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        out = sched.schedule()
        if out.phase is Phase.DECODE:
            copied_in += out.copy_pairs("swap_in") + out.copy_pairs("prefetch")
        sched.update_from_output(out, RunnerOutput([1] * len(out.seqs), [None] * len(out.seqs)))
    # One decode phase: the prefix's 12 blocks once, then each sequence's own last block.
    assert sched.num_transitions == 1
    assert len(copied_in) == 12 + 10
    assert_empty(dev, host)
