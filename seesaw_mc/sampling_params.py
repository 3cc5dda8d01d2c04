"""SamplingParams: vLLM-compatible per-request generation settings (pure Python)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Union

from seesaw_mc.errors import ConfigError

_EPS = 1e-5


@dataclass
class SamplingParams:
    """Per-request sampling settings; validated on construction (ValueError naming the field)."""

    n: int = 1
    """Number of completions for the prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with cumulative probability >= top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's, in [0, 1]."""
    seed: Optional[int] = None
    """Per-request seed: the same seed gives the same tokens whatever the batch or layout."""
    max_tokens: Optional[int] = 16
    """Most tokens to generate; None means up to the model's context."""
    stop: Optional[Union[str, List[str]]] = None
    """Strings that end generation; the text is cut before the stop string."""
    stop_token_ids: Optional[List[int]] = None
    """Token ids that end generation (kept in token_ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    logprobs: Optional[int] = None
    """Return the top-N log-probabilities of every generated token (plus the sampled one)."""
    skip_special_tokens: bool = True
    """Drop special tokens when detokenizing."""
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check()
        if self.temperature < _EPS:
            # Greedy: the other knobs cannot change argmax.
            self.temperature, self.top_k, self.top_p, self.min_p = 0.0, 0, 1.0, 0.0

    def _check(self) -> None:
        def bad(name, why):
            raise ConfigError(f"SamplingParams.{name} {why} (got {getattr(self, name)!r})")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or 0/-1 to disable")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not is_num(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be an integer or None")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1 or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be true or false")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "must be an integer >= 0 or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    def clone(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)
