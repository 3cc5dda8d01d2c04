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

        return cls(f"{name}" + (f" x{scale:g}" if scale != 1 else ""), tuple(length_pairs(name, n, seed, scale)))

    @classmethod
    def from_jsonl(cls, path: str, default_max_tokens: int = 256) -> "Workload":
        """A batch-job input (every format `seesaw-mc generate` reads; invalid lines left out):
        prompt_token_ids count exactly, text about 4 characters per token (no tokenizer here)."""
        from seesaw_mc.inputs import read_requests
        from seesaw_mc.sampling_params import SamplingParams

        specs, _ = read_requests(path, SamplingParams(max_tokens=default_max_tokens), skip_invalid=True)
        pairs = []
        for r in specs:
            text = r.prompt if r.prompt is not None else \
                "".join(str(m.get("content", "")) for m in (r.messages or []) if isinstance(m, dict))
            n_in = len(r.prompt_token_ids) if r.prompt_token_ids is not None else max(1, len(text) // 4)
            pairs.append((n_in, r.params.max_tokens or default_max_tokens))
        if not pairs:
            raise ConfigError(f"workload file {path!r} has no request lines")
        return cls(os.path.basename(path), tuple(pairs))


def resolve_workload(spec: str, num_prompts: int = 500, scale: float = 1.0) -> Workload:
    from seesaw_mc.workloads import DATASETS

    if spec in DATASETS and spec != "fixed":
        return Workload.preset(spec, num_prompts, scale)
    if os.path.isfile(spec):
        return Workload.from_jsonl(spec)
    raise ConfigError(f"unknown workload {spec!r}: arxiv-like, sharegpt-like, random or a JSONL file")
