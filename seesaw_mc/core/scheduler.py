"""Continuous-batching scheduler (pure Python, no torch).

The whole interface: `add(seq)`, `schedule() -> SchedulerOutput` (which says the phase),
`finish(seq)`. Prefill and decode are separate phases, never mixed in one step: Seesaw runs
them in different parallel layouts.

Policy: admit waiting sequences (FIFO) whenever their whole prompt fits the free blocks and
the prefill token budget; otherwise decode every running sequence. When a decode step needs
a block and none is free, the most recently admitted sequence is preempted by recompute: it
gives back its blocks and returns to the head of the queue with prompt + output so far.
Nothing is ever dropped.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Tuple

from seesaw_mc.kv.block_manager import BlockManager, blocks_needed
from seesaw_mc.sequence import Sequence, SequenceStatus


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class SchedulerOutput:
    phase: Phase
    seqs: List[Sequence]
    preempted: List[Sequence] = field(default_factory=list)
    # Two-tier KV (SeesawScheduler): (seq, [(device_block, host_block), ...]) to copy
    # host -> device before the step (swap_in), host -> device in the background while the
    # step computes, for sequences decoded from the next step on (prefetch), device -> host
    # before the step (swap_out), and device -> host right after a prefill step (offload).
    swap_in: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)
    prefetch: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)
    # The step reuses device blocks whose offload may still be copying: finish it first.
    wait_copies: bool = False
    swap_out: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)
    offload: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs) if self.phase is Phase.PREFILL else len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Keep a few blocks free at admission so that decode does not preempt at once.
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: Deque[Sequence] = deque()
        self.running: Deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = blocks_needed(len(seq) + 1, self.bm.block_size)
        if need > self.bm.num_blocks:
            raise ValueError(f"{seq} needs {need} KV blocks, the cache has {self.bm.num_blocks}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = self._schedule_prefill()
        return out if out is not None else self._schedule_decode()

    def _admit(self, can_take, take) -> List[Sequence]:
        """FIFO admission of waiting sequences within the prefill token budget, while
        can_take(seq, batch) allows; take(seq) gives it its blocks."""
        batch: List[Sequence] = []
        num_tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            if batch and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not can_take(seq, batch):
                break
            take(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.append(seq)
            num_tokens += len(seq)
        return batch

    def _schedule_prefill(self):
        def can_take(seq, batch):
            if len(self.running) + len(batch) >= self.max_num_seqs:
                return False
            # An empty engine always admits its head (add() checked it fits alone).
            reserve = self.watermark_blocks if (self.running or batch) else 0
            return blocks_needed(len(seq), self.bm.block_size) + reserve <= self.bm.num_free_blocks

        batch = self._admit(can_take, self.bm.allocate)
        if not batch:
            return None
        self.running.extend(batch)
        return SchedulerOutput(Phase.PREFILL, batch)

    def _decode_running(self, evict) -> Tuple[List[Sequence], List[Sequence]]:
        """Give every running sequence a slot for its next token, evicting the newest ones
        (evict(victim)) while blocks run out. Returns (scheduled, evicted)."""
        scheduled: List[Sequence] = []
        evicted: List[Sequence] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                victim = self.running.pop() if self.running else seq
                evict(victim)
                evicted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                scheduled.append(seq)
        # Keep admission order: scheduled ones first, then the ones beyond max_num_seqs.
        self.running.extendleft(reversed(scheduled))
        return scheduled, evicted

    def _schedule_decode(self) -> SchedulerOutput:
        scheduled, preempted = self._decode_running(self._preempt)
        # Preempted sequences go back to the head of the queue, oldest first.
        for seq in sorted(preempted, key=lambda s: s.arrival, reverse=True):
            self.waiting.appendleft(seq)
        return SchedulerOutput(Phase.DECODE, scheduled, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)


class SeesawScheduler(Scheduler):
    """Transition-minimising scheduling over two KV tiers (Seesaw's third idea).

    The rule (config: SchedulerConfig.decode_watermark):
      - PREFILL admits waiting prompts, FIFO, while the host tier can take the next prompt's
        KV and the device tier can hold the step; right after the step the prompts' KV moves
        to the host tier ("offload") and their device blocks are free again.
      - When the next prompt does not fit the host tier (or nothing waits): DECODE. Decode
        keeps the device tier full from the host tier and decodes the resident sequences
        only. As device blocks free up, swapped sequences are prefetched: their KV is copied
        host -> device in the background while the step computes, and they join the decode
        batch at the next step, once resident (their host blocks are released then). Only
        when nothing is resident (the first decode step) is the copy made before the step,
        as there is no compute to hide it behind. Device overflow swaps the newest
        resident sequence back to the host tier, or, if the host is full too, preempts it
        for recompute. Nothing is dropped.
      - Back to PREFILL only when the host tier is drained (every swapped sequence is
        resident) and the decode batch has fallen to decode_watermark x the largest batch of
        this decode phase (the most the device tier held); what is still resident is swapped
        out to the host first.
    Every prefill -> decode switch is one layout transition.
    """

    def __init__(self, device: BlockManager, host: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 decode_watermark: float = 0.25):
        super().__init__(device, max_num_seqs, max_num_batched_tokens, watermark=0.0)
        self.host = host
        self.swapped: Deque[Sequence] = deque()
        self.phase = Phase.PREFILL
        self.decode_watermark = decode_watermark
        self.num_transitions = 0
        self._peak_running = 0
        self._copied_in: List[Sequence] = []  # swapped in last step: host blocks free to release
        self._prefetching: List[Sequence] = []  # copied in during the last step: resident now
        self._offloading: List[Sequence] = []  # prefilled last step: offload in flight
        self._offloaded: List[Sequence] = []  # prefilled the step before: offload done

    def add(self, seq: Sequence) -> None:
        need = blocks_needed(len(seq) + 1, self.bm.block_size)
        if need > self.bm.num_blocks or blocks_needed(len(seq), self.host.block_size) > self.host.num_blocks:
            raise ValueError(f"{seq} needs {need} KV blocks: more than the device tier ({self.bm.num_blocks}) "
                             f"or the host tier ({self.host.num_blocks}) holds")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.swapped or self.running or self._prefetching)

    def schedule(self) -> SchedulerOutput:
        # The runner finishes last step's background copies before this step's first copy
        # or compute, so prefetched sequences are resident now.
        self.running.extend(self._prefetching)
        self._prefetching = []
        # NOTE: host blocks of sequences swapped in are released one step later, once the
        # copies of that step are done (this step's swap-outs may reuse them).
        for s in self._copied_in:
            if s.status is SequenceStatus.RUNNING:
                self.host.free(s)
        self._copied_in = []
        self._release_offloaded()
        if self.phase is Phase.DECODE and self._should_prefill():
            self.phase = Phase.PREFILL
            # What is still resident goes to the host tier: the prefill layout cannot read it.
            leftover = list(self.running)
            self.running.clear()
            swap_out = [p for p in (self._swap_out(s, preempt=False) for s in reversed(leftover)) if p]
            out = self._schedule_prefill()
            if out is not None:
                out.swap_out = swap_out
                return out
            self.phase = Phase.DECODE  # _should_prefill checked the head fits; defensive only
            out = self._schedule_decode()
            out.swap_out = swap_out + out.swap_out
            return out
        if self.phase is Phase.PREFILL:
            out = self._schedule_prefill() if self._head_fits() else None
            if out is None and self._offloaded and self._head_fits(device=False):
                # The device tier is full only of the last step's prompts, whose offload is
                # in flight: wait for it and reuse their blocks rather than switch early.
                self._release(self._offloaded)
                self._offloaded = []
                out = self._schedule_prefill() if self._head_fits() else None
                if out is not None:
                    out.wait_copies = True
            if out is not None:
                return out
            self.phase = Phase.DECODE
            self.num_transitions += 1
            self._peak_running = 0
        return self._schedule_decode()

    # -- prefill -------------------------------------------------------------------------
    def _head_fits(self, extra_host_blocks: int = 0, device: bool = True) -> bool:
        if not self.waiting:
            return False
        n = len(self.waiting[0])
        return (blocks_needed(n, self.host.block_size) + extra_host_blocks <= self.host.num_free_blocks
                and (not device or blocks_needed(n, self.bm.block_size) <= self.bm.num_free_blocks))

    def _schedule_prefill(self):
        def take(seq):
            self.bm.allocate(seq)
            self.host.allocate(seq)

        batch = self._admit(lambda seq, batch: len(batch) < self.max_num_seqs and self._head_fits(), take)
        if not batch:
            return None
        offload = [(s, list(zip(s.block_table, s.host_block_table))) for s in batch]
        return SchedulerOutput(Phase.PREFILL, batch, offload=offload)

    def after_prefill(self, seqs: List[Sequence]) -> None:
        """The step computed these prompts; their KV is being offloaded to the host tier in
        the background while the next step runs, so their device blocks are released one step
        later (release_offloaded)."""
        for s in seqs:
            if s.status is SequenceStatus.FINISHED:
                continue
            s.status = SequenceStatus.WAITING
            self.swapped.append(s)
            self._offloading.append(s)

    def _release_offloaded(self) -> None:
        self._release(self._offloaded)
        self._offloaded, self._offloading = self._offloading, []

    def _release(self, seqs: List[Sequence]) -> None:
        """Device blocks of prompts whose offload is done (host blocks too if they finished)."""
        for s in seqs:
            if s.block_table and s.status is not SequenceStatus.RUNNING:
                self.bm.free(s)
            if s.status is SequenceStatus.FINISHED:
                self.host.free(s)

    # -- decode --------------------------------------------------------------------------
    def _should_prefill(self) -> bool:
        if self.swapped or not self.waiting:
            return False
        if len(self.running) > self.decode_watermark * self._peak_running:
            return False
        leftover = sum(blocks_needed(len(s) - 1, self.host.block_size) - len(s.host_block_table)
                       for s in self.running)
        return self._head_fits(extra_host_blocks=leftover) or not self.running

    def _schedule_decode(self) -> SchedulerOutput:
        swap_in = []
        # With sequences resident, new ones are prefetched behind this step's compute; with
        # none, they are copied in first and decoded at once.
        background = bool(self.running)
        incoming = self._prefetching if background else self.running
        # Keep the device tier full from the host tier, leaving each resident sequence room to grow.
        while self.swapped and len(self.running) + len(self._prefetching) < self.max_num_seqs:
            seq = self.swapped[0]
            need = blocks_needed(len(seq), self.bm.block_size)
            resident = len(self.running) + len(self._prefetching)
            if need + resident > self.bm.num_free_blocks and resident:
                break
            if need > self.bm.num_free_blocks:
                break
            self.swapped.popleft()
            self.bm.allocate(seq)
            n = blocks_needed(len(seq) - 1, self.bm.block_size)
            swap_in.append((seq, list(zip(seq.block_table[:n], seq.host_block_table[:n]))))
            seq.status = SequenceStatus.RUNNING
            incoming.append(seq)
            self._copied_in.append(seq)
        self._peak_running = max(self._peak_running, len(self.running) + len(self._prefetching))
        swap_out = []

        def evict(victim):
            pairs = self._swap_out(victim)
            if pairs is not None:
                swap_out.append(pairs)

        scheduled, preempted = self._decode_running(evict)
        if background:
            return SchedulerOutput(Phase.DECODE, scheduled, preempted, prefetch=swap_in, swap_out=swap_out)
        return SchedulerOutput(Phase.DECODE, scheduled, preempted, swap_in=swap_in, swap_out=swap_out)

    def _swap_out(self, seq: Sequence, preempt: bool = True):
        """Device -> host for a resident sequence, or recompute when the host is full."""
        if preempt:
            seq.num_preemptions += 1
            self.num_preemptions += 1
        cached = len(seq) - 1  # the last sampled token has no KV yet
        need = blocks_needed(cached, self.host.block_size) - len(seq.host_block_table)
        if need <= self.host.num_free_blocks:
            self.host.allocate(seq, cached)
            n = blocks_needed(cached, self.bm.block_size)
            pairs = (seq, list(zip(seq.block_table[:n], seq.host_block_table[:n])))
            self.bm.free(seq)
            seq.status = SequenceStatus.WAITING
            self.swapped.appendleft(seq)
            return pairs
        self.bm.free(seq)
        self.host.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return None

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if self.phase is Phase.PREFILL:
            # Done in its prefill step, whose offload of it is already queued: its blocks are
            # released with that offload's, so that no later step reuses them mid-copy.
            self._offloading.append(seq)
            return
        self.bm.free(seq)
        self.host.free(seq)
        if seq in self.running:
            self.running.remove(seq)
