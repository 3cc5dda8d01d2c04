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


class StopRules:
    """The engine's stop rules for a sampled token: EOS, stop token ids, stop strings,
    max_tokens and the context limit. Sets the sequence's finish/stop reason when it stops."""

    def __init__(self, tokenizer, eos_token_ids, max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def __call__(self, seq, tok: int) -> bool:
        p = seq.params
        if not p.ignore_eos and tok in self.eos_token_ids:
            seq.finish_reason = "stop"
            return True
        if tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
            return True
        if p.stop:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            hits = [(text.find(s), s) for s in p.stop if s in text]
            if hits:
                at, s = min(hits)
                seq.text = text[: at + len(s)] if p.include_stop_str_in_output else text[:at]
                seq.finish_reason, seq.stop_reason = "stop", s
                return True
        if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or len(seq) >= self.max_model_len:
            seq.finish_reason = "length"
            return True
        return False


def completion_output(seq, tokenizer) -> CompletionOutput:
    """A finished sequence as the user sees it: text decoded, logprobs with their tokens."""
    text = seq.text
    if text is None:
        text = tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens)
    lps = None
    if seq.params.logprobs is not None:
        lps = seq.logprobs
        for entry in lps:
            for tid, lp in entry.items():
                lp.decoded_token = tokenizer.decode([tid])
    return CompletionOutput(
        index=seq.index, text=text, token_ids=seq.output_token_ids,
        cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
        logprobs=lps, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        num_preemptions=seq.num_preemptions)
