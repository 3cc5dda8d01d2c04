"""Paged KV block accounting (pure Python, no torch).

A sequence of L tokens owns ceil(L / block_size) blocks; slot i of the sequence lives at
block_table[i // block_size] * block_size + i % block_size.

Copy tickets: a block that a background copy still reads or writes must not be handed to
anyone else. `free(seq, ticket=t)` parks the blocks under copy ticket t; they become free
only at `complete(t)`, which the scheduler calls for exactly the tickets that the next step
waits for (StepPlan.wait_for): the runner finishes those copies before that step copies or
computes anything. So reuse-after-copy is a rule of the block manager, not a matter of timing.
"""
from __future__ import annotations

from collections import deque
from typing import Dict, List, Optional, Tuple


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Blocks of one KV tier. `table` names the Sequence attribute holding this tier's block
    ids ("block_table" for the device tier, "host_block_table" for the host tier)."""

    def __init__(self, num_blocks: int, block_size: int, table: str = "block_table"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.table = table
        self._free = deque(range(num_blocks))
        self._held: Dict[int, List[int]] = {}  # copy ticket -> blocks freed while it copies
        self._completed: set = set()  # tickets completed before all their blocks were freed

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    # -- prefill: a waiting sequence gets blocks for all its tokens ---------------------
    def can_allocate(self, seq) -> bool:
        return blocks_needed(len(seq), self.block_size) <= len(self._free)

    def allocate(self, seq, num_tokens: int = None) -> None:
        """Give seq blocks for num_tokens tokens (default: all of its tokens)."""
        table = getattr(seq, self.table)
        n = blocks_needed(len(seq) if num_tokens is None else num_tokens, self.block_size) - len(table)
        if n > len(self._free):
            raise RuntimeError(f"allocate({seq}) needs {n} blocks, {len(self._free)} free")
        table.extend(self._free.popleft() for _ in range(max(n, 0)))

    # -- decode: the token at position len(seq)-1 is written this step ------------------
    def needs_new_block(self, seq) -> bool:
        return len(seq.block_table) * self.block_size < len(seq)

    def can_append(self, seq) -> bool:
        return not self.needs_new_block(seq) or len(self._free) > 0

    def append_slot(self, seq) -> None:
        if self.needs_new_block(seq):
            if not self._free:
                raise RuntimeError(f"append_slot({seq}): no free block")
            seq.block_table.append(self._free.popleft())

    def free(self, seq, ticket: Optional[int] = None) -> None:
        """Give back seq's blocks: now, or at complete(ticket) when a copy still uses them."""
        blocks = getattr(seq, self.table)
        setattr(seq, self.table, [])
        if ticket is not None and ticket not in self._completed:
            self._held.setdefault(ticket, []).extend(blocks)
            return
        # Most recently allocated first, so that a re-admitted sequence tends to get warm blocks.
        self._free.extendleft(reversed(blocks))

    def complete(self, ticket: int) -> None:
        """Copy `ticket` is done (or the step about to run waits for it): its blocks are free.
        NOTE: with steps in flight, a step's sequences may be freed under its ticket after the
        ticket completed; those blocks are free at once (a later step cannot run before the
        step that waits for the copy)."""
        self._free.extendleft(reversed(self._held.pop(ticket, [])))
        self._completed.add(ticket)
        if len(self._completed) > 256:  # only tickets of steps still in flight matter
            self._completed.remove(min(self._completed))

    def free_runs(self) -> List[Tuple[int, int]]:
        """The free blocks as (first, count) runs of consecutive ids."""
        runs: List[List[int]] = []
        for b in sorted(self._free):
            if runs and runs[-1][0] + runs[-1][1] == b:
                runs[-1][1] += 1
            else:
                runs.append([b, 1])
        return [(a, n) for a, n in runs]

    @property
    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self._held.values())

    def slot(self, seq, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
