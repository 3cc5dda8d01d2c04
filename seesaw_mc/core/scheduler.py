"""Continuous-batching scheduler (pure Python, no torch).

The whole interface: `add(seq)`, `schedule() -> SchedulerOutput` (which says the phase and
the KV copies), then `update_from_output(out, runner_output)` with what the step sampled
(tokens appended, stops checked, finished sequences released). Prefill and decode are
separate phases, never mixed in one step: Seesaw runs them in different parallel layouts.

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
from typing import Callable, Deque, Dict, List, Optional, Tuple

from seesaw_mc.core.block_manager import BlockManager, blocks_needed
from seesaw_mc.core.sequence import Sequence, SequenceStatus


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
    swap_out: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)
    offload: List[Tuple[Sequence, List[Tuple[int, int]]]] = field(default_factory=list)
    # Copy tickets (see core/block_manager.py): the background copies this step starts, and
    # those that must be done before it copies or computes anything.
    offload_ticket: Optional[int] = None
    prefetch_ticket: Optional[int] = None
    wait_for: List[int] = field(default_factory=list)
    # Host-tier blocks free at a decode -> prefill transition, as (first, count) runs: their
    # pages go back to the OS (the host tier is a sparse file; only blocks in use take memory).
    release_host: List[Tuple[int, int]] = field(default_factory=list)

    def copy_pairs(self, kind: str) -> List[Tuple[int, int]]:
        """All (device_block, host_block) pairs of one kind of copy, flattened."""
        return [p for _, pairs in getattr(self, kind) for p in pairs]

    @property
    def num_tokens(self) -> int:
        """Tokens computed: a prefill computes each prompt after its cached prefix."""
        if self.phase is Phase.PREFILL:
            return sum(len(s) - s.num_cached_tokens for s in self.seqs)
        return len(self.seqs)


@dataclass
class RunnerOutput:
    """What a step gives back to the scheduler: a token (and its logprobs entry, or None)
    per scheduled sequence, in batch order."""

    token_ids: List[int]
    logprobs: List[Optional[tuple]]


def never_stop(seq: Sequence, token: int) -> bool:
    return False


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, stop_check: Callable[[Sequence, int], bool] = never_stop):
        self.stop_check = stop_check
        """stop_check(seq, new_token) -> bool: the engine's stop rules (EOS, stop strings, length)."""
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Keep a few blocks free at admission so that decode does not preempt at once.
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: Deque[Sequence] = deque()
        self.running: Deque[Sequence] = deque()
        self.num_preemptions = 0
        self.prefill_tokens_saved = 0
        """Prompt tokens not computed because a cached prefix held their KV."""
        self.steps_in_flight = 0
        """Steps scheduled whose tokens are not back yet (update_from_output)."""
        self.decode_groups = 1
        """Under pipeline parallelism the engine keeps up to pp steps in flight, and decode takes
        1/decode_groups of the running sequences per step: each group's next step can start as
        soon as its own tokens are back, so no stage waits for the last (vLLM's virtual engines)."""

    @property
    def tiers(self) -> Dict[str, BlockManager]:
        """This scheduler's KV tiers by name."""
        return {"device": self.bm}

    def add(self, seq: Sequence) -> None:
        need = blocks_needed(len(seq) + 1, self.bm.block_size)
        if need > self.bm.num_blocks:
            raise ValueError(f"{seq} needs {need} KV blocks, the cache has {self.bm.num_blocks}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.steps_in_flight)

    def schedule(self) -> SchedulerOutput:
        out = self._next_step()
        if out.seqs:
            self.steps_in_flight += 1
            for s in out.seqs:
                s.in_flight = True
        return out

    def _next_step(self) -> SchedulerOutput:
        out = self._schedule_prefill()
        return out if out is not None else self._schedule_decode()

    def _admit(self, can_take, take) -> List[Sequence]:
        """FIFO admission of waiting sequences within the prefill token budget (tokens to
        compute: a cached prefix is free), while can_take(seq, batch) allows; take(seq) gives
        it its blocks and returns how many leading blocks a cached prefix already filled."""
        batch: List[Sequence] = []
        num_tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            cost = len(seq) - len(self.bm.cached_prefix(seq)) * self.bm.block_size
            if batch and num_tokens + cost > self.max_num_batched_tokens:
                break
            if not can_take(seq, batch):
                break
            seq.num_cached_tokens = take(seq) * self.bm.block_size
            self.prefill_tokens_saved += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.append(seq)
            num_tokens += len(seq) - seq.num_cached_tokens
        return batch

    def _schedule_prefill(self):
        def can_take(seq, batch):
            if len(self.running) + len(batch) >= self.max_num_seqs:
                return False
            # An empty engine always admits its head (add() checked it fits alone).
            reserve = self.watermark_blocks if (self.running or batch) else 0
            return self.bm.new_blocks_needed(seq) + reserve <= self.bm.num_free_blocks

        batch = self._admit(can_take, self.bm.allocate)
        if not batch:
            return None
        self.running.extend(batch)
        return SchedulerOutput(Phase.PREFILL, batch)

    def _decode_running(self, evict) -> Tuple[List[Sequence], List[Sequence]]:
        """Give running sequences (those not in flight; a group of them, see decode_groups) a
        slot for their next token, evicting the newest idle ones (evict(victim)) while blocks run
        out. Returns (scheduled, evicted)."""
        scheduled: List[Sequence] = []
        evicted: List[Sequence] = []
        passed: List[Sequence] = []  # scheduled or in flight, in admission order
        limit = self.max_num_seqs
        if self.decode_groups > 1:
            limit = min(limit, -(-len(self.running) // self.decode_groups))
        while self.running and len(scheduled) < limit:
            seq = self.running.popleft()
            if seq.in_flight:
                passed.append(seq)
                continue
            while not self.bm.can_append(seq):
                victim = self._newest_idle() or seq
                evict(victim)
                evicted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                scheduled.append(seq)
                passed.append(seq)
        # Keep admission order: these first, then the ones not reached.
        self.running.extendleft(reversed(passed))
        return scheduled, evicted

    def _newest_idle(self) -> Optional[Sequence]:
        """Take the most recently admitted running sequence not in flight out of `running`."""
        for i in range(len(self.running) - 1, -1, -1):
            if not self.running[i].in_flight:
                seq = self.running[i]
                del self.running[i]
                return seq
        return None

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

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> List[Sequence]:
        """The step's sampled tokens: append them, apply the stop rules, release what
        finished. Returns the sequences that finished in this step."""
        if out.seqs:
            self.steps_in_flight -= 1
        for seq in out.seqs:
            seq.in_flight = False
        finished = []
        for seq, tok, lp in zip(out.seqs, result.token_ids, result.logprobs):
            seq.append_token(tok, lp)
            if self.stop_check(seq, tok):
                self.finish(seq)
                finished.append(seq)
        self._after_step(out)
        return finished

    def _after_step(self, out: SchedulerOutput) -> None:
        """Hook for policies with more than one KV tier."""

    def finish(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
