"""Synthetic workloads shaped like the paper's (Seesaw, MLSys'25, Fig. 9 and Fig. 13).

Lengths in tokens, before `scale` (CPU runs use scale < 1 to keep the same shape):
  arxiv-like    input  ~ lognormal(median 4000, sigma 0.45), clipped to [1024, 12000]
                output ~ normal(mean 200, sd 60), clipped to [50, 400]
                (arxiv-summarization: long documents, short summaries)
  sharegpt-like input  ~ lognormal(median 220, sigma 0.9), clipped to [4, 2048]
                output ~ lognormal(median 200, sigma 0.9), clipped to [4, 2048]
                (ShareGPT conversations: input and output of comparable length, hundreds of tokens)
  random        input ~ uniform[16, 400], output ~ uniform[16, 128] (the vLLM comparison's workload, DESIGN.md)
  fixed         input = input_len, output = output_len (Fig. 13: input 3000, output:input 0 to 0.3)
  prefix-shared one of 10 system prompts of uniform[300, 800] tokens, then a unique suffix of
                uniform[20, 200]; output uniform[50, 200] (batch jobs that repeat instructions: the
                prefix-sharing benchmark of issue 18)
Token ids are uniform over the vocabulary minus its first and last 100 ids (where special
tokens usually live); requests run with ignore_eos so every output has its drawn length.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple


@dataclass
class Request:
    prompt_token_ids: List[int]
    output_len: int


def _clip(x: float, lo: int, hi: int) -> int:
    return int(min(max(round(x), lo), hi))


DATASETS = ("arxiv-like", "sharegpt-like", "random", "fixed", "prefix-shared")
SYSTEM_PROMPTS = 10
"""prefix-shared: how many distinct system prompts the requests share."""


def _draw(rng: random.Random, name: str, input_len: int, output_len: int) -> Tuple[int, int]:
    if name == "arxiv-like":
        return _clip(rng.lognormvariate(math.log(4000), 0.45), 1024, 12000), _clip(rng.gauss(200, 60), 50, 400)
    if name == "sharegpt-like":
        return (_clip(rng.lognormvariate(math.log(220), 0.9), 4, 2048),
                _clip(rng.lognormvariate(math.log(200), 0.9), 4, 2048))
    if name == "random":
        return rng.randint(16, 400), rng.randint(16, 128)
    if name == "fixed":
        return input_len, output_len
    raise ValueError(f"unknown dataset {name!r} ({', '.join(DATASETS)})")


def length_pairs(name: str, num_prompts: int, seed: int = 0, scale: float = 1.0, input_len: int = 3000,
                 output_len: int = 300, max_model_len: Optional[int] = None) -> List[Tuple[int, int]]:
    """(input, output) lengths of `num_prompts` requests: the same as make_workload's."""
    if name == "prefix-shared":
        systems, draws = _prefix_shared(num_prompts, seed, scale)
        return [(systems[k] + n, o) for k, n, o in draws]
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        i, o = _draw(rng, name, input_len, output_len)
        i, o = max(1, round(i * scale)), max(1, round(o * scale))
        if max_model_len is not None and i + o > max_model_len:
            i = max(1, max_model_len - o)
        out.append((i, o))
    return out


def _prefix_shared(num_prompts: int, seed: int, scale: float) -> Tuple[List[int], List[Tuple[int, int, int]]]:
    """prefix-shared: the system prompts' lengths, and per request (system prompt, suffix length, output length)."""
    rng = random.Random(seed)
    systems = [max(1, round(rng.randint(300, 800) * scale)) for _ in range(SYSTEM_PROMPTS)]
    draws = [(rng.randrange(SYSTEM_PROMPTS), max(1, round(rng.randint(20, 200) * scale)),
              max(1, round(rng.randint(50, 200) * scale))) for _ in range(num_prompts)]
    return systems, draws


def make_workload(name: str, num_prompts: int, vocab_size: int, seed: int = 0, scale: float = 1.0,
                  input_len: int = 3000, output_len: int = 300, max_model_len: Optional[int] = None) -> List[Request]:
    ids_rng = random.Random(f"{seed}-token-ids")  # its own stream: lengths do not depend on the vocabulary

    def ids(n: int) -> List[int]:
        return [ids_rng.randrange(100, vocab_size - 100) for _ in range(n)]

    if name == "prefix-shared":
        lengths, draws = _prefix_shared(num_prompts, seed, scale)
        systems = [ids(n) for n in lengths]
        return [Request(systems[k] + ids(n), o) for k, n, o in draws]
    return [Request(ids(i), o) for i, o in length_pairs(name, num_prompts, seed, scale, input_len, output_len,
                                                          max_model_len)]
