"""Token sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Randomness is stateless per token: the draw for a sequence's i-th output token uses a
generator seeded from (sequence seed, i). The same seed therefore gives the same tokens
whatever the batch composition, the layout, preemption or a crash and resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

_MASK64 = (1 << 63) - 1


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: Optional[str] = None


def step_seed(seed: int, index: int) -> int:
    # splitmix64-style mixing so that nearby seeds and steps give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK64


def apply_filters(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Rows of fp32 logits -> probabilities after temperature, top-k, top-p and min-p."""
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs_sorted = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    drop |= (probs_sorted.cumsum(dim=-1) - probs_sorted) >= top_p[:, None]
    drop |= probs_sorted < (min_p[:, None] * probs_sorted[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return filtered.softmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs) -> Tuple[List[int], List[Optional[Tuple[float, Dict[int, Logprob]]]]]:
        """logits [B, V] fp32 for seqs -> (token per seq, (sampled logprob, top-N dict) or None per seq)."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            ps = [seqs[i].params for i in rows]
            dev = logits.device
            probs = apply_filters(
                logits.index_select(0, idx),
                torch.tensor([p.temperature for p in ps], device=dev),
                torch.tensor([max(p.top_k, 0) for p in ps], device=dev),
                torch.tensor([p.top_p for p in ps], device=dev),
                torch.tensor([p.min_p for p in ps], device=dev),
            )
            gen = torch.Generator(device=dev)
            q = torch.empty_like(probs)
            for j, i in enumerate(rows):
                gen.manual_seed(step_seed(seqs[i].seed, seqs[i].num_output_tokens))
                q[j].exponential_(generator=gen)
            # Exponential race: argmax(p / E) draws from p exactly.
            tokens[idx] = (probs / q).argmax(dim=-1)
        token_list = tokens.tolist()
        lp_out: List[Optional[Tuple[float, Dict[int, Logprob]]]] = [None] * len(seqs)
        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if lp_rows:
            lps = torch.log_softmax(logits[lp_rows], dim=-1)
            for j, i in enumerate(lp_rows):
                n, tok = seqs[i].params.logprobs, token_list[i]
                row = lps[j]
                chosen = row[tok].item()
                entries: Dict[int, Logprob] = {}
                if n > 0:
                    vals, ids = row.topk(min(n, row.numel()))
                    for r, (v, t) in enumerate(zip(vals.tolist(), ids.tolist())):
                        entries[t] = Logprob(v, r + 1)
                if tok not in entries:
                    entries[tok] = Logprob(chosen, int((row > chosen).sum().item()) + 1)
                lp_out[i] = (chosen, entries)
        return token_list, lp_out
