"""What the leader rank sends every other rank of its replica each step, and how a step is cut
into pipeline micro-batches (pure Python).

Workers keep a mirror of every resident sequence, so a step carries only differences: whole
sequences when they are (re)prefilled, then during decode just the tokens sampled since the
worker last heard of the sequence and any new blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from seesaw_mc.core.scheduler import SchedulerOutput
from seesaw_mc.core.sequence import Sequence

PREFILL_MICROBATCH_TOKENS = 256
"""Smallest prefill micro-batch worth a pipeline slot: below it matmuls lose efficiency faster
than the pipeline bubble shrinks."""


def num_microbatches(pp: int, is_prefill: bool, tokens: int) -> int:
    """Micro-batches of one step over `tokens` tokens. Decode: pp (1/pp of the batch each).
    Prefill: up to 8 x pp of PREFILL_MICROBATCH_TOKENS or more (prompts are cut to even pieces,
    split_prefill). The pipeline fills at the start of a prefill phase and drains at its
    end for one micro-batch, so small ones shrink both: on the test bed (pp2, 4,096-token steps)
    16 micro-batches took the prefill phase from 12.7 to 11.3 s against 8 (median of 3 pairs).
    The planner's cost model uses the same rule."""
    if pp == 1 or not is_prefill:
        return pp
    return max(pp, min(8 * pp, tokens // PREFILL_MICROBATCH_TOKENS))


def split_microbatches(seqs: list, n: int) -> List[list]:
    """Decode: `n` contiguous micro-batches of about equal counts of sequences."""
    n = max(1, min(n, len(seqs)))
    return [seqs[len(seqs) * i // n:len(seqs) * (i + 1) // n] for i in range(n)]


class PromptPiece(NamedTuple):
    """Tokens start..stop-1 of a sequence, computed in one prefill micro-batch."""
    seq: object
    start: int
    stop: int

    @property
    def samples(self) -> bool:
        """The piece ends the sequence: its last token's logits give the next token."""
        return self.stop == len(self.seq)


def split_prefill(seqs: list, n: int) -> List[List[PromptPiece]]:
    """Prefill: `n` contiguous micro-batches of about equal token counts, each prompt after its
    cached prefix. A prompt may be cut between two micro-batches: the later piece attends to
    the K/V the earlier one wrote, on every stage before it runs. Even pieces keep the pipeline
    full: its fill and drain last one micro-batch, whatever the prompts' lengths (whole prompts
    only: the first one of a long arxiv prompt alone filled 1.3 s of a 10 s prefill, measured)."""
    total = sum(len(s) - s.num_cached_tokens for s in seqs)
    n = max(1, min(n, total))
    out: List[List[PromptPiece]] = [[] for _ in range(n)]
    done, k = 0, 0  # tokens placed so far; the micro-batch being filled, which ends at token end(k)
    end = lambda k: total * (k + 1) // n  # noqa: E731
    for s in seqs:
        pos = s.num_cached_tokens
        while pos < len(s):
            while done >= end(k):
                k += 1
            stop = min(len(s), pos + end(k) - done)
            out[k].append(PromptPiece(s, pos, stop))
            done += stop - pos
            pos = stop
    return out


@dataclass
class NewSeq:
    seq_id: int
    token_ids: List[int]
    num_prompt_tokens: int
    block_table: List[int]
    params: Any
    seed: int
    num_cached_tokens: int = 0
    """Leading tokens whose KV its blocks hold already (a shared prefix): a prefill computes the rest."""


@dataclass
class StepPlan:
    kind: str
    """"prefill" or "decode" (also the name of the layout the step runs in; a change means a
    transition first), "idle" (nothing to do yet: the leader waits for the other DP replicas),
    or "stop" (leave the worker loop)."""
    order: List[int] = field(default_factory=list)
    """Sequence ids of the batch, in batch order."""
    new: List[NewSeq] = field(default_factory=list)
    appended: List[Tuple[int, List[int], List[int]]] = field(default_factory=list)
    """(seq_id, tokens since last sync, blocks since last sync)."""
    freed: List[int] = field(default_factory=list)
    swap_out: List[Tuple[int, int]] = field(default_factory=list)
    """(device_block, host_block) pairs to copy to the host tier before the step."""
    swap_in: List[Tuple[int, int]] = field(default_factory=list)
    """(device_block, host_block) pairs to copy from the host tier before the step."""
    prefetch: List[Tuple[int, int]] = field(default_factory=list)
    """(device_block, host_block) pairs to copy from the host tier while the step computes."""
    offload: List[Tuple[int, int]] = field(default_factory=list)
    """(device_block, host_block) pairs to copy to the host tier after a prefill step."""
    prefetch_ticket: Optional[int] = None
    offload_ticket: Optional[int] = None
    """Copy tickets of this step's background copies (core/block_manager.py)."""
    wait_for: List[int] = field(default_factory=list)
    """Tickets of background copies to finish before this step copies or computes anything:
    the scheduler has released their blocks, and this step may reuse them."""
    release_host: List[Tuple[int, int]] = field(default_factory=list)
    """Host-tier blocks whose pages go back to the OS at this step's transition: (first, count) runs."""
    num_microbatches: Optional[int] = None
    """Micro-batches of this step; None: num_microbatches()'s rule."""
    payload: Any = None
    """"stop" plans may carry a result for every rank (e.g. generate()'s outputs)."""


class PlanBuilder:
    """Leader side: tracks what the workers already know about each sequence."""

    def __init__(self):
        self._synced: Dict[int, Tuple[int, int]] = {}
        self._freed: List[int] = []
        self._wait_for: List[int] = []  # tickets of a step that had nothing to send: the next plan waits

    def plan_step(self, out: SchedulerOutput) -> Optional[StepPlan]:
        """The plan of one scheduled step, or None when it has nothing to compute or copy
        (what it would have told the workers then rides with the next plan)."""
        for s in out.preempted + [s for s, _ in out.swap_out]:  # resent whole if they come back
            self.forget(s)
        self._wait_for += out.wait_for
        if not (out.seqs or out.swap_out or out.swap_in or out.prefetch):
            return None
        plan = self.build(out.phase.value, out.seqs)
        plan.swap_out, plan.swap_in = out.copy_pairs("swap_out"), out.copy_pairs("swap_in")
        plan.prefetch, plan.offload = out.copy_pairs("prefetch"), out.copy_pairs("offload")
        plan.prefetch_ticket, plan.offload_ticket = out.prefetch_ticket, out.offload_ticket
        plan.release_host = out.release_host
        plan.wait_for, self._wait_for = self._wait_for, []
        return plan

    def after_step(self, out: SchedulerOutput, finished: List[Sequence]) -> None:
        """Forget what left the device in the step: finished sequences, offloaded prompts."""
        for s in finished + (out.seqs if out.offload else []):
            self.forget(s)

    def forget(self, seq: Sequence) -> None:
        if self._synced.pop(seq.seq_id, None) is not None:
            self._freed.append(seq.seq_id)

    def build(self, kind: str, seqs: List[Sequence]) -> StepPlan:
        plan = StepPlan(kind, order=[s.seq_id for s in seqs], freed=self._freed)
        self._freed = []
        for s in seqs:
            if kind == "prefill" or s.seq_id not in self._synced:  # (re)prefilled or swapped back in
                plan.new.append(NewSeq(s.seq_id, list(s.token_ids), s.num_prompt_tokens, list(s.block_table),
                                       s.params, s.seed, s.num_cached_tokens))
            else:
                n_tok, n_blk = self._synced[s.seq_id]
                plan.appended.append((s.seq_id, s.token_ids[n_tok:], s.block_table[n_blk:]))
            self._synced[s.seq_id] = (len(s.token_ids), len(s.block_table))
        return plan


class SequenceMirror:
    """Worker side: the sequences a step refers to, rebuilt from plans."""

    def __init__(self):
        self.seqs: Dict[int, Sequence] = {}

    def apply(self, plan: StepPlan) -> List[Sequence]:
        for sid in plan.freed:
            self.seqs.pop(sid, None)
        for n in plan.new:
            s = Sequence(None, 0, n.token_ids[: n.num_prompt_tokens], n.params, n.seed)
            s.seq_id = n.seq_id
            s.token_ids = list(n.token_ids)
            s.block_table = list(n.block_table)
            s.num_cached_tokens = n.num_cached_tokens
            self.seqs[n.seq_id] = s
        for sid, toks, blocks in plan.appended:
            s = self.seqs[sid]
            s.token_ids.extend(toks)
            s.block_table.extend(blocks)
        return [self.seqs[sid] for sid in plan.order]
