"""vLLM-compatible result objects."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[List[Dict[int, Any]]]
    finish_reason: Optional[str]
    """"stop" (EOS, stop token or stop string) or "length" (max_tokens or the model's context)."""
    stop_reason: Any = None
    """The stop string or stop token id that ended generation, else None."""
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: Any
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = True
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def usage(self) -> Dict[str, int]:
        completion = sum(len(o.token_ids) for o in self.outputs)
        return {"prompt_tokens": len(self.prompt_token_ids), "completion_tokens": completion,
                "total_tokens": len(self.prompt_token_ids) + completion}
