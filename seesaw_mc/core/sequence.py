"""Sequence: the scheduler's unit of work (pure Python, no torch)."""
from __future__ import annotations

import enum
import itertools
from typing import List, Optional

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion stream of a request.

    NOTE: `token_ids` is prompt + output. After preemption by recompute the whole of it is
    prefilled again, so `num_prompt_tokens` stays the user's prompt length while the amount
    to prefill is `len(token_ids)`.
    """

    __slots__ = (
        "seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "params", "status",
        "block_table", "host_block_table", "finish_reason", "stop_reason", "arrival",
        "num_preemptions", "logprobs", "cumulative_logprob", "text", "seed", "in_flight", "num_cached_tokens",
    )

    def __init__(self, request_id, index: int, prompt_token_ids: List[int], params, seed: int):
        self.seq_id = next(_ids)
        self.arrival = self.seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: List[int] = []
        self.host_block_table: List[int] = []
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.num_preemptions = 0
        self.logprobs: List[dict] = []
        self.cumulative_logprob = 0.0
        self.text: Optional[str] = None
        self.in_flight = False
        """Scheduled in a step whose token is not back yet (pipeline parallelism keeps steps
        in flight): it can be neither scheduled again nor evicted until then."""
        self.num_cached_tokens = 0
        """Leading tokens whose KV a shared prefix already holds at its (last) prefill: that
        prefill computed only the tokens after them."""

    def append_token(self, token: int, logprob=None) -> None:
        """A sampled token; `logprob`: (its logprob, {token: Logprob}) when logprobs were asked for."""
        self.token_ids.append(token)
        if logprob is not None:
            self.cumulative_logprob += logprob[0]
            self.logprobs.append(logprob[1])

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence(id={self.seq_id}, req={self.request_id!r}, len={len(self)}, {self.status.value})"
