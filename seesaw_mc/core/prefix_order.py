"""Prefix-aware admission order for a whole offline job (pure Python, no torch).

An offline job knows every request before it starts, so requests that share a prompt prefix
can be admitted together, while that prefix is cached, instead of whenever they happen to come
(BatchLLM, arXiv 2412.03594, groups them the same way). Requests whose prompts share their
first block form a group; a group takes the place of its first request in the input, and within
it prompts are in token order, so that deeper common prefixes sit next to each other (a trie's
walk). Requests that share nothing keep their relative order. Every request is served in a
finite job, so grouping delays a request by at most the groups that start before it; and a
request's tokens never depend on its neighbours (stateless per-token seeds), so the order
changes speed only, not output.
"""
from __future__ import annotations

from typing import Dict, List, Sequence


def prefix_order(prompts: Sequence[Sequence[int]], block_size: int) -> List[int]:
    """A permutation of range(len(prompts)): the order in which to admit them."""
    groups: Dict[tuple, List[int]] = {}
    for i, p in enumerate(prompts):
        # Shorter than a block: nothing to share, a group of its own.
        key = tuple(p[:block_size]) if len(p) > block_size else ("alone", i)
        groups.setdefault(key, []).append(i)
    order: List[int] = []
    for members in groups.values():  # dicts keep insertion order: the first member's place
        if len(members) > 1:
            members = sorted(members, key=lambda i: (list(prompts[i]), i))
        order.extend(members)
    return order
