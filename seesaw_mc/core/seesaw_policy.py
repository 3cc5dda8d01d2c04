"""Seesaw's transition-minimising policy over two KV tiers (pure Python, no torch)."""
from __future__ import annotations

import itertools
from collections import deque
from typing import Deque, Dict, List, Optional

from seesaw_mc.core.block_manager import BlockManager, blocks_needed
from seesaw_mc.core.scheduler import Phase, Scheduler, SchedulerOutput
from seesaw_mc.core.sequence import Sequence, SequenceStatus


class SeesawScheduler(Scheduler):
    """Transition-minimising scheduling over two KV tiers (Seesaw's third idea).

    The rule (config: SchedulerConfig.decode_watermark):
      - PREFILL admits waiting prompts, FIFO, while the host tier can take the next prompt's
        KV and the device tier can hold the step; right after the step the prompts' KV moves
        to the host tier ("offload", in the background behind the next step) and their device
        blocks are free again once that copy is done (its ticket; see core/block_manager.py).
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

    Copy tickets: a prefill step waits for every copy but the last step's offload, which
    overlaps it (unless it needs that offload's blocks: then it waits for it too); any other
    step waits for every copy. Device blocks an offload reads and host blocks it writes are
    held by its ticket, released when a step waits for it (`_settle`). Host blocks a swap-in
    or prefetch reads are released at the next schedule, after `_settle` (a decode step
    waits for every copy), unless the sequence went back to the host tier meanwhile.
    """

    def __init__(self, device: BlockManager, host: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 decode_watermark: float = 0.25, **kwargs):
        super().__init__(device, max_num_seqs, max_num_batched_tokens, watermark=0.0, **kwargs)
        self.host = host
        self.swapped: Deque[Sequence] = deque()
        self.phase = Phase.PREFILL
        self.decode_watermark = decode_watermark
        self.num_transitions = 0
        self._peak_running = 0
        self._copied_in: List[Sequence] = []  # swapped in last step: host blocks free to release
        self._prefetching: List[Sequence] = []  # copied in during the last step: resident now
        self._tickets = itertools.count()
        self._in_flight: List[int] = []  # tickets of background copies no step has waited for yet
        self._last_offload: Optional[int] = None  # the last prefill step's offload ticket
        self._updating: Optional[SchedulerOutput] = None  # the step update_from_output reports

    @property
    def tiers(self) -> Dict[str, BlockManager]:
        return {"device": self.bm, "host": self.host}

    def add(self, seq: Sequence) -> None:
        need = blocks_needed(len(seq) + 1, self.bm.block_size)
        if need > self.bm.num_blocks or blocks_needed(len(seq), self.host.block_size) > self.host.num_blocks:
            raise ValueError(f"{seq} needs {need} KV blocks: more than the device tier ({self.bm.num_blocks}) "
                             f"or the host tier ({self.host.num_blocks}) holds")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.swapped or self.running or self._prefetching or self.steps_in_flight)

    def _settle(self, keep_last_offload: bool) -> List[int]:
        """The tickets this step waits for: every copy in flight, but the last prefill step's
        offload when the step may overlap it. Their blocks are released now."""
        keep = self._last_offload if keep_last_offload else None
        done = [t for t in self._in_flight if t != keep]
        self._in_flight = [t for t in self._in_flight if t == keep]
        for t in done:
            self.bm.complete(t)
            self.host.complete(t)
        return done

    def _next_step(self) -> SchedulerOutput:
        wait_for = self._settle(keep_last_offload=self.phase is Phase.PREFILL)
        out = self._schedule()
        out.wait_for = wait_for + out.wait_for
        for t in (out.offload_ticket, out.prefetch_ticket):
            if t is not None:
                self._in_flight.append(t)
        if out.seqs or not self.steps_in_flight:  # a stall keeps the last offload overlapping
            self._last_offload = out.offload_ticket
        return out

    def _stall(self) -> SchedulerOutput:
        """Nothing until the steps in flight are back: a phase switch (a layout transition)
        waits for the old layout's steps, and so does a prefill that needs their blocks."""
        return SchedulerOutput(self.phase, [])

    def _schedule(self) -> SchedulerOutput:
        # Every copy of the last step but an offload is done before this step (its wait_for),
        # so prefetched sequences are resident now.
        self.running.extend(self._prefetching)
        self._prefetching = []
        # NOTE: host blocks of sequences swapped in are released one step later, once the
        # copies of that step are done (this step's swap-outs may reuse them).
        for s in self._copied_in:
            if s.status is SequenceStatus.RUNNING:
                self.host.free(s)
        self._copied_in = []
        if self.phase is Phase.DECODE and self._should_prefill():
            if self.steps_in_flight:
                return self._stall()
            self.phase = Phase.PREFILL
            # What is still resident goes to the host tier: the prefill layout cannot read it.
            leftover = list(self.running)
            self.running.clear()
            swap_out = [p for p in (self._swap_out(s, preempt=False) for s in reversed(leftover)) if p]
            self.bm.drop_cache()  # the device tier's cached blocks are the decode layout's
            out = self._schedule_prefill()
            if out is not None:
                out.swap_out = swap_out
                out.release_host = self.host.free_runs()
                return out
            self.phase = Phase.DECODE  # _should_prefill checked the head fits; defensive only
            out = self._schedule_decode()
            out.swap_out = swap_out + out.swap_out
            return out
        if self.phase is Phase.PREFILL:
            out = self._schedule_prefill() if self._head_fits() else None
            if out is None and self.steps_in_flight:
                return self._stall()
            waited = []
            if out is None and self._in_flight and self._head_fits(device=False):
                # The device tier is full only of the last step's prompts, whose offload is
                # in flight: wait for it and reuse their blocks rather than switch early.
                waited = self._settle(keep_last_offload=False)
                out = self._schedule_prefill() if self._head_fits() else None
                if out is not None:
                    out.wait_for = waited
            if out is not None:
                return out
            waited += self._settle(keep_last_offload=False)  # decode waits for every copy
            self.phase = Phase.DECODE
            self.bm.drop_cache()  # the device tier's cached blocks are the prefill layout's
            self.num_transitions += 1
            self._peak_running = 0
            out = self._schedule_decode()
            out.wait_for = waited
            return out
        return self._schedule_decode()

    # -- prefill -------------------------------------------------------------------------
    def _head_fits(self, extra_host_blocks: int = 0, device: bool = True) -> bool:
        if not self.waiting:
            return False
        seq = self.waiting[0]  # unique blocks: a cached prefix in use by others costs nothing
        return (self.host.new_blocks_needed(seq) + extra_host_blocks <= self.host.num_free_blocks
                and (not device or self.bm.new_blocks_needed(seq) <= self.bm.num_free_blocks))

    def _schedule_prefill(self):
        stored = {}  # seq_id -> leading host blocks that already hold its prefix: not offloaded

        def take(seq):
            computed = self.bm.allocate(seq)
            stored[seq.seq_id] = self.host.allocate(seq)
            return computed

        batch = self._admit(lambda seq, batch: len(batch) < self.max_num_seqs and self._head_fits(), take)
        if not batch:
            return None
        offload = [(s, list(zip(s.block_table, s.host_block_table))[stored[s.seq_id]:]) for s in batch]
        return SchedulerOutput(Phase.PREFILL, batch, offload=offload, offload_ticket=next(self._tickets))

    def _after_step(self, out: SchedulerOutput) -> None:
        """After a prefill step its prompts' KV is offloaded to the host tier in the
        background while the next step runs: their device blocks are held by the offload's
        ticket until a step waits for it."""
        if out.offload_ticket is None:
            return
        for s in out.seqs:
            if s.status is SequenceStatus.FINISHED:
                continue
            s.status = SequenceStatus.WAITING
            self.swapped.append(s)
            self.bm.free(s, ticket=out.offload_ticket)

    # -- decode --------------------------------------------------------------------------
    def _should_prefill(self) -> bool:
        if self.swapped or not self.waiting:
            return False
        if len(self.running) > self.decode_watermark * self._peak_running:
            return False
        leftover = sum(self.host.new_blocks_needed(s, len(s) - 1) for s in self.running)
        return self._head_fits(extra_host_blocks=leftover) or not self.running

    def _schedule_decode(self) -> SchedulerOutput:
        swap_in = []
        # With sequences resident, new ones are prefetched behind this step's compute; with
        # none, they are copied in first and decoded at once.
        background = bool(self.running)
        incoming = self._prefetching if background else self.running
        # Keep the device tier full from the host tier, leaving each resident sequence room to grow.
        bs = self.bm.block_size
        while self.swapped and len(self.running) + len(self._prefetching) < self.max_num_seqs:
            seq = self.swapped[0]
            cached = len(seq) - 1  # the last sampled token has no KV yet
            need = self.bm.new_blocks_needed(seq, cached) + (blocks_needed(len(seq), bs) > blocks_needed(cached, bs))
            resident = len(self.running) + len(self._prefetching)
            if need + resident > self.bm.num_free_blocks and resident:
                break
            if need > self.bm.num_free_blocks:
                break
            self.swapped.popleft()
            # Blocks a resident sequence already copied in (a shared prefix) are copied once.
            first = self.bm.allocate(seq, cached)
            n = len(seq.block_table)
            self.bm.append_slot(seq)  # the block the next token's KV goes to, if a new one
            swap_in.append((seq, list(zip(seq.block_table[first:n], seq.host_block_table[first:n]))))
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
            ticket = next(self._tickets) if swap_in else None
            return SchedulerOutput(Phase.DECODE, scheduled, preempted, prefetch=swap_in, swap_out=swap_out,
                                   prefetch_ticket=ticket)
        return SchedulerOutput(Phase.DECODE, scheduled, preempted, swap_in=swap_in, swap_out=swap_out)

    def _swap_out(self, seq: Sequence, preempt: bool = True):
        """Device -> host for a resident sequence, or recompute when the host is full."""
        if preempt:
            seq.num_preemptions += 1
            self.num_preemptions += 1
        cached = len(seq) - 1  # the last sampled token has no KV yet
        if self.host.new_blocks_needed(seq, cached) <= self.host.num_free_blocks:
            first = self.host.allocate(seq, cached)  # blocks the host tier holds already are not copied
            n = blocks_needed(cached, self.bm.block_size)
            pairs = (seq, list(zip(seq.block_table[first:n], seq.host_block_table[first:n])))
            self.bm.free(seq)
            seq.status = SequenceStatus.WAITING
            self.swapped.appendleft(seq)
            return pairs
        self.bm.free(seq)
        self.host.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return None

    def update_from_output(self, out: SchedulerOutput, result) -> List[Sequence]:
        self._updating = out
        try:
            return super().update_from_output(out, result)
        finally:
            self._updating = None

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        # Done in its prefill step, whose offload of it is already queued: both tiers' blocks
        # are held by that copy's ticket, so that no later step reuses them mid-copy.
        ticket = self._updating.offload_ticket if self._updating is not None else None
        self.bm.free(seq, ticket=ticket)
        self.host.free(seq, ticket=ticket)
        if seq in self.running:
            self.running.remove(seq)
