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
from typing import Deque, List, Optional

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

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs) if self.phase is Phase.PREFILL else len(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = 0.01, decode_watermark: Optional[float] = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Keep a few blocks free at admission so that decode does not preempt at once.
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: Deque[Sequence] = deque()
        self.running: Deque[Sequence] = deque()
        self.num_preemptions = 0
        # Two layouts: stick to decode until the batch drains to this fraction (see config).
        self.decode_watermark = decode_watermark
        self.last_phase: Optional[Phase] = None
        self._decode_start_size = 0

    def add(self, seq: Sequence) -> None:
        need = blocks_needed(len(seq) + 1, self.bm.block_size)
        if need > self.bm.num_blocks:
            raise ValueError(f"{seq} needs {need} KV blocks, the cache has {self.bm.num_blocks}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = None
        if not self._stay_in_decode():
            out = self._schedule_prefill()
        if out is None:
            if self.last_phase is not Phase.DECODE:
                self._decode_start_size = len(self.running)
            out = self._schedule_decode()
        self.last_phase = out.phase
        return out

    def _stay_in_decode(self) -> bool:
        if self.decode_watermark is None or self.last_phase is not Phase.DECODE or not self.running:
            return False
        return len(self.running) > self.decode_watermark * self._decode_start_size

    def _schedule_prefill(self):
        batch: List[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and num_tokens + len(seq) > self.max_num_batched_tokens:
                break
            need = blocks_needed(len(seq), self.bm.block_size)
            # An empty engine always admits its head (add() checked it fits alone).
            reserve = self.watermark_blocks if (self.running or batch) else 0
            if need + reserve > self.bm.num_free_blocks:
                break
            self.bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.waiting.popleft()
            batch.append(seq)
            num_tokens += len(seq)
        if not batch:
            return None
        self.running.extend(batch)
        return SchedulerOutput(Phase.PREFILL, batch)

    def _schedule_decode(self) -> SchedulerOutput:
        scheduled: List[Sequence] = []
        preempted: List[Sequence] = []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.bm.append_slot(seq)
                scheduled.append(seq)
        # Keep admission order: scheduled ones first, then the ones beyond max_num_seqs.
        self.running.extendleft(reversed(scheduled))
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
