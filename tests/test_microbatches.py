"""How a step is cut into pipeline micro-batches (pure Python): even prefill pieces (prompts
cut between micro-batches where need be), decode by count."""
import random

import pytest

from seesaw_mc.core.step_plan import PREFILL_MICROBATCH_TOKENS, num_microbatches, split_microbatches, split_prefill


class _Seq:
    def __init__(self, n: int, cached: int = 0):
        self.token_ids = list(range(n))
        self.num_cached_tokens = cached

    def __len__(self):
        return len(self.token_ids)


def test_prefill_pieces_are_even_and_cover_each_prompt_in_order():
    rng = random.Random(0)
    for _ in range(500):
        seqs = [_Seq(rng.randint(1, 60)) for _ in range(rng.randint(1, 6))]
        for s in seqs:
            s.num_cached_tokens = rng.randint(0, len(s) - 1)
        n = rng.randint(1, 12)
        mbs = split_prefill(seqs, n)
        total = sum(len(s) - s.num_cached_tokens for s in seqs)
        assert len(mbs) == min(n, total) and all(mbs)
        sizes = [sum(p.stop - p.start for p in mb) for mb in mbs]
        assert max(sizes) - min(sizes) <= 1
        pieces = iter(p for mb in mbs for p in mb)
        for s in seqs:  # each prompt after its cached prefix, in pieces that follow each other
            pos = s.num_cached_tokens
            while pos < len(s):
                p = next(pieces)
                assert p.seq is s and p.start == pos and p.stop > pos
                assert p.samples == (p.stop == len(s))
                pos = p.stop
        assert next(pieces, None) is None


def test_a_long_prompt_is_cut_so_the_first_microbatch_stays_small():
    long, short = _Seq(3000), _Seq(100)
    mbs = split_prefill([long, short], 4)
    assert [[(p.start, p.stop) for p in mb] for mb in mbs] == [
        [(0, 775)], [(775, 1550)], [(1550, 2325)], [(2325, 3000), (0, 100)]]
    assert [p.samples for mb in mbs for p in mb] == [False, False, False, True, True]


def test_microbatch_counts():
    assert num_microbatches(1, True, 100_000) == 1
    assert num_microbatches(2, False, 4096) == 2  # decode: one per stage
    assert num_microbatches(2, True, 100) == 2
    assert num_microbatches(2, True, 4096) == 4096 // PREFILL_MICROBATCH_TOKENS == 16
    assert num_microbatches(2, True, 100_000) == 16  # at most 8 per stage
    assert [len(mb) for mb in split_microbatches(list(range(7)), 3)] == [2, 2, 3]
    assert split_microbatches(list(range(2)), 4) == [[0], [1]]


@pytest.mark.parametrize("n", [1, 3])
def test_fewer_tokens_than_microbatches(n):
    mbs = split_prefill([_Seq(n)], 8)
    assert len(mbs) == n and [p.samples for mb in mbs for p in mb][-1]
