"""Paged KV block accounting (pure Python, no torch).

A sequence of L tokens owns ceil(L / block_size) blocks; slot i of the sequence lives at
block_table[i // block_size] * block_size + i % block_size.

Copy tickets: a block that a background copy still reads or writes must not be handed to
anyone else. `free(seq, ticket=t)` parks the blocks under copy ticket t; they become free
only at `complete(t)`, which the scheduler calls for exactly the tickets that the next step
waits for (StepPlan.wait_for): the runner finishes those copies before that step copies or
computes anything. So reuse-after-copy is a rule of the block manager, not a matter of timing.

Prefix caching (`enable_caching`): a full block is known by its content, the chain of token
blocks from the sequence's start: (the previous block's content id, this block's tokens).
Content ids are never reused, so a key names one exact token prefix (no hash collisions,
and a child of an evicted block can never match a new chain). Blocks are reference-counted:
sequences with a common prefix point at the same blocks, stored once per tier. A block whose
last user left stays cached among the free blocks and is evicted (least recently freed, deepest
block first) only when a fresh block is needed. Only full blocks are shared and a sequence
never reuses the block holding its last cached token, so the block a sequence writes next is
always its own: generation never writes into a shared block (no copy-on-write is needed).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Blocks of one KV tier. `table` names the Sequence attribute holding this tier's block
    ids ("block_table" for the device tier, "host_block_table" for the host tier)."""

    def __init__(self, num_blocks: int, block_size: int, table: str = "block_table", enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.table = table
        self.enable_caching = enable_caching
        # Free blocks in the order they are handed out: uncached ones first (most recently
        # freed first, warm), then cached ones, least recently freed first.
        self._free: "OrderedDict[int, None]" = OrderedDict.fromkeys(range(num_blocks))
        self._ref = [0] * num_blocks
        self._held: Dict[int, List[int]] = {}  # copy ticket -> blocks freed while it copies
        self._completed: set = set()  # tickets completed before all their blocks were freed
        self._content: Dict[tuple, int] = {}  # (parent content id, block tokens) -> content id
        self._block_of: Dict[int, int] = {}  # content id -> block
        self._key_of: Dict[int, tuple] = {}  # block -> its key (cached blocks only)
        self._cid_of: Dict[int, int] = {}  # block -> its content id (cached blocks only)
        self._cids = itertools.count(1)  # 0: the empty prefix
        self.queried_blocks = 0
        """Full blocks looked up in the cache at allocation (cached prefixes: the hit rate's denominator)."""
        self.hit_blocks = 0
        """Of those, blocks found cached and shared instead of computed or copied."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted when needed)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    # -- prefix cache ---------------------------------------------------------------------
    def _keys(self, seq, num_blocks: int, parent: int = 0):
        toks, bs = seq.token_ids, self.block_size
        for i in range(num_blocks):
            yield parent, tuple(toks[i * bs:(i + 1) * bs])

    def cached_prefix(self, seq, num_tokens: Optional[int] = None) -> List[int]:
        """The cached blocks that hold seq's first tokens, at most up to (but not including) the
        block of token num_tokens - 1 (default len(seq)): that token's block is always written
        by the sequence itself."""
        if not self.enable_caching:
            return []
        n = len(seq) if num_tokens is None else num_tokens
        blocks, parent = [], 0
        for i in range(max(n - 1, 0) // self.block_size):
            cid = self._content.get((parent, tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])))
            if cid is None:
                break
            blocks.append(self._block_of[cid])
            parent = cid
        return blocks

    def new_blocks_needed(self, seq, num_tokens: Optional[int] = None) -> int:
        """Free blocks that allocate(seq, num_tokens) would take: cached blocks in use by other
        sequences cost nothing, cached free ones leave the free pool."""
        n = len(seq) if num_tokens is None else num_tokens
        table = getattr(seq, self.table)
        shared = 0 if table else sum(1 for b in self.cached_prefix(seq, n) if self._ref[b] > 0)
        return blocks_needed(n, self.block_size) - len(table) - shared

    def _register(self, seq, table: List[int], first: int, num_tokens: int) -> None:
        """Cache the full blocks table[first:] that will hold seq's first num_tokens tokens."""
        bs = self.block_size
        parent = 0
        if first > 0:
            parent = self._cid_of.get(table[first - 1])
            if parent is None:  # the chain is broken (a block that was not cached)
                return
        for i in range(first, min(num_tokens // bs, len(table))):
            b = table[i]
            if b in self._key_of:  # already cached (a reused block)
                parent = self._cid_of[b]
                continue
            key = (parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            if key in self._content:  # the same content lives in another block: keep that one
                parent = self._content[key]
                continue
            cid = next(self._cids)
            self._content[key], self._block_of[cid] = cid, b
            self._key_of[b], self._cid_of[b] = key, cid
            parent = cid

    def _evict(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            cid = self._cid_of.pop(block)
            del self._content[key], self._block_of[cid]

    def drop_cache(self) -> None:
        """Forget every cached block (their contents are about to mean something else, e.g. the
        device tier after a layout switch)."""
        self._content.clear()
        self._block_of.clear()
        self._key_of.clear()
        self._cid_of.clear()

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    # -- prefill: a waiting sequence gets blocks for all its tokens ---------------------
    def can_allocate(self, seq) -> bool:
        return self.new_blocks_needed(seq) <= len(self._free)

    def allocate(self, seq, num_tokens: int = None) -> int:
        """Give seq blocks for num_tokens tokens (default: all of its tokens), whose KV this step
        computes or copies. Returns how many of its leading blocks already hold their KV (cached
        blocks now shared, or full blocks it already had and that are cached): the caller
        computes or copies only the blocks after them."""
        n_tok = len(seq) if num_tokens is None else num_tokens
        table = getattr(seq, self.table)
        reused = []
        if self.enable_caching and not table:
            reused = self.cached_prefix(seq, n_tok)
            self.queried_blocks += max(n_tok - 1, 0) // self.block_size
            self.hit_blocks += len(reused)
        n = blocks_needed(n_tok, self.block_size) - len(table) - len(reused)
        free_after_hits = len(self._free) - sum(1 for b in reused if self._ref[b] == 0)
        if n > free_after_hits:
            raise RuntimeError(f"allocate({seq}) needs {n} blocks, {free_after_hits} free")
        for b in reused:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        table.extend(reused)
        done = len(table)
        if not reused:  # an existing table: its leading cached blocks are complete
            done = next((i for i, b in enumerate(table) if b not in self._key_of), len(table))
        for _ in range(max(n, 0)):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref[b] = 1
            table.append(b)
        if self.enable_caching:
            self._register(seq, table, done, n_tok)
        return done

    # -- decode: the token at position len(seq)-1 is written this step ------------------
    def needs_new_block(self, seq) -> bool:
        return len(seq.block_table) * self.block_size < len(seq)

    def can_append(self, seq) -> bool:
        return not self.needs_new_block(seq) or len(self._free) > 0

    def append_slot(self, seq) -> None:
        if self.needs_new_block(seq):
            if not self._free:
                raise RuntimeError(f"append_slot({seq}): no free block")
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._ref[b] = 1
            seq.block_table.append(b)

    def free(self, seq, ticket: Optional[int] = None) -> None:
        """Give back seq's blocks: now, or at complete(ticket) when a copy still uses them."""
        blocks = getattr(seq, self.table)
        setattr(seq, self.table, [])
        if ticket is not None and ticket not in self._completed:
            self._held.setdefault(ticket, []).extend(blocks)
            return
        self._release(blocks)

    def _release(self, blocks: List[int]) -> None:
        # Deepest first, so that a prefix outlives its continuations in the cache.
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            self._free[b] = None
            if b not in self._key_of:
                # Uncached: handed out next, so that a re-admitted sequence tends to get warm blocks.
                self._free.move_to_end(b, last=False)

    def complete(self, ticket: int) -> None:
        """Copy `ticket` is done (or the step about to run waits for it): its blocks are free.
        NOTE: with steps in flight, a step's sequences may be freed under its ticket after the
        ticket completed; those blocks are free at once (a later step cannot run before the
        step that waits for the copy)."""
        self._release(self._held.pop(ticket, []))
        self._completed.add(ticket)
        if len(self._completed) > 256:  # only tickets of steps still in flight matter
            self._completed.remove(min(self._completed))

    def free_runs(self) -> List[Tuple[int, int]]:
        """The free blocks that hold nothing worth keeping (cached ones are kept), as
        (first, count) runs of consecutive ids."""
        runs: List[List[int]] = []
        for b in sorted(b for b in self._free if b not in self._key_of):
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
