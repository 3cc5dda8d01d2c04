"""What the planner plans for: the (input, output) lengths of a batch job's requests, from a
synthetic preset or a batch-job input file."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Tuple

from seesaw_mc.errors import ConfigError


@dataclass(frozen=True)
class Workload:
    name: str
    lengths: Tuple[Tuple[int, int], ...]
    """(input, output) tokens of each request."""
    shared_in: float = 0.0
    """Mean prompt tokens per request that a prefix shared with an earlier request holds (full
    blocks): with prefix caching they are neither computed nor stored again (shared_prefix_tokens)."""

    @property
    def unique_in(self) -> float:
        """Mean prompt tokens per request that are computed and stored."""
        return self.mean_in - self.shared_in

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def mean_in(self) -> float:
        return sum(i for i, _ in self.lengths) / self.n

    @property
    def mean_out(self) -> float:
        return sum(o for _, o in self.lengths) / self.n

    def out_quantile(self, q: float) -> float:
        outs = sorted(o for _, o in self.lengths)
        return outs[min(len(outs) - 1, max(0, math.ceil(q * len(outs)) - 1))]

    @classmethod
    def preset(cls, name: str, n: int = 500, scale: float = 1.0, seed: int = 0) -> "Workload":
        from seesaw_mc.workloads import length_pairs

        label = f"{name}" + (f" x{scale:g}" if scale != 1 else "")
        if name == "prefix-shared":  # the only preset whose prompts share anything
            from seesaw_mc.workloads import make_workload

            reqs = make_workload(name, n, 1 << 15, seed, scale)
            return cls(label, tuple((len(r.prompt_token_ids), r.output_len) for r in reqs),
                       shared_prefix_tokens([r.prompt_token_ids for r in reqs]))
        return cls(label, tuple(length_pairs(name, n, seed, scale)))

    @classmethod
    def from_jsonl(cls, path: str, default_max_tokens: int = 256) -> "Workload":
        """A batch-job input (every format `seesaw-mc generate` reads; invalid lines left out):
        prompt_token_ids count exactly, text about 4 characters per token (no tokenizer here)."""
        from seesaw_mc.inputs import read_requests
        from seesaw_mc.sampling_params import SamplingParams

        specs, _ = read_requests(path, SamplingParams(max_tokens=default_max_tokens), skip_invalid=True)
        known = [r.prompt_token_ids for r in specs if r.prompt_token_ids is not None]
        pairs = []
        for r in specs:
            text = r.prompt if r.prompt is not None else \
                "".join(str(m.get("content", "")) for m in (r.messages or []) if isinstance(m, dict))
            n_in = len(r.prompt_token_ids) if r.prompt_token_ids is not None else max(1, len(text) // 4)
            pairs.append((n_in, r.params.max_tokens or default_max_tokens))
        if not pairs:
            raise ConfigError(f"workload file {path!r} has no request lines")
        return cls(os.path.basename(path), tuple(pairs), shared_prefix_tokens(known) * len(known) / len(pairs))


def shared_prefix_tokens(prompts, block_size: int = 16) -> float:
    """Mean tokens per prompt that the engine's block manager would find cached, the prompts
    admitted in its order (core/prefix_order.py) into a tier large enough that nothing is
    evicted. 0 for no prompts."""
    from seesaw_mc.core.block_manager import BlockManager, blocks_needed
    from seesaw_mc.core.prefix_order import prefix_order
    from seesaw_mc.core.sequence import Sequence

    if not prompts:
        return 0.0
    bm = BlockManager(sum(blocks_needed(len(p), block_size) for p in prompts) or 1, block_size, enable_caching=True)
    for i in prefix_order(prompts, block_size):
        seq = Sequence(None, 0, prompts[i], None, seed=0)
        bm.allocate(seq)
        bm.free(seq)  # its blocks stay cached
    return bm.hit_blocks * block_size / len(prompts)


def resolve_workload(spec: str, num_prompts: int = 500, scale: float = 1.0) -> Workload:
    from seesaw_mc.workloads import DATASETS

    if spec in DATASETS and spec != "fixed":
        return Workload.preset(spec, num_prompts, scale)
    if os.path.isfile(spec):
        return Workload.from_jsonl(spec)
    raise ConfigError(f"unknown workload {spec!r}: arxiv-like, sharegpt-like, random, prefix-shared or a JSONL file")
