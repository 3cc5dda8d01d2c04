"""The vLLM-compatible offline surface: LLM, SamplingParams, RequestOutput."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from seesaw_mc.config import EngineConfig
from seesaw_mc.driver import Request, drive
from seesaw_mc.errors import InputError
from seesaw_mc.outputs import CompletionOutput, RequestOutput
from seesaw_mc.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]

PromptType = Union[str, List[int], Dict[str, Any]]


class LLM:
    """LLM(model_dir, dtype="auto", **engine_options).generate(prompts, sampling_params)."""

    def __init__(self, model: str, **kwargs):
        from seesaw_mc.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **kwargs))
        self._next_id = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (as vLLM's); call it on every rank, between generate() calls."""
        return self.engine.reset_prefix_cache()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _to_token_ids(self, prompt: PromptType, i: int):
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            return prompt, tok.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], tok.encode(prompt["prompt"])
            raise InputError(f"prompt {i}: a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise InputError(f"prompt {i}: expected a string, a list of token ids or a dict (got {type(prompt).__name__})")

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of `prompts`."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(sampling_params)} SamplingParams")
        requests = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            text, ids = self._to_token_ids(prompt, i)
            rid = f"{self._next_id + i}"
            # Every prompt is checked before any is queued: a bad one must not leave half a batch behind.
            self.engine.validate_prompt(rid, ids)
            requests.append(Request(rid, ids, params, text))
        self._next_id += len(requests)
        done: Dict[str, RequestOutput] = {}
        parts = drive(self.engine, requests, lambda out: done.__setitem__(out.request_id, out), use_tqdm,
                      result=lambda: list(done.values()))
        by_id = {o.request_id: o for part in parts for o in part}
        return [by_id[r.request_id] for r in requests]

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Chat messages (one conversation or a list of them) through the tokenizer's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                                      tokenize=True, return_dict=False))}
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
