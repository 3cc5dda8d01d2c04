"""The vLLM-compatible offline surface: LLM, SamplingParams, RequestOutput."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from tqdm.auto import tqdm

from seesaw_mc.config import EngineConfig
from seesaw_mc.errors import InputError, SeesawError
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
            self.engine.validate_prompt(rid, ids)
            requests.append((rid, ids, params, text))
        self._next_id += len(requests)
        eng = self.engine
        if not eng.is_leader:
            # Every rank runs the same script (torchrun); followers serve the leader's plans
            # and return the same outputs.
            return eng.worker_loop()
        # Validated everything first: a bad prompt must not leave half a batch queued.
        # DP replicas split the requests round-robin; their leaders pool the outputs.
        mine = requests[eng.dp_rank::eng.dp_size]
        for rid, ids, params, text in mine:
            eng.add_request(rid, ids, params, prompt=text)

        def work():
            outs = self._run([r[0] for r in mine], use_tqdm)
            if eng.dp_size == 1:
                return outs
            by_id = {o.request_id: o for part in eng.gather_across_replicas(outs) for o in part}
            return [by_id[r[0]] for r in requests]

        return lead(eng, work)

    def chat(self, messages, sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Chat messages (one conversation or a list of them) through the tokenizer's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                                      tokenize=True, return_dict=False))}
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: List[str], use_tqdm: bool) -> List[RequestOutput]:
        done: Dict[str, RequestOutput] = {}
        run_engine(self.engine, len(order), use_tqdm, lambda out: done.__setitem__(out.request_id, out))
        return [done[rid] for rid in order]


def lead(engine, work: Callable[[], Any]):
    """Leader: do the work, then release the followers with its result (or its error)."""
    try:
        result = work()
    except SeesawError as e:
        engine.finish_run(e)
        raise
    except BaseException as e:
        engine.finish_run(SeesawError(f"the leader rank failed: {type(e).__name__}: {e}"))
        raise
    engine.finish_run(result if engine.runner.replica_size > 1 else None)  # followers return it too
    return result


def run_engine(engine, total: int, use_tqdm: bool, on_output: Callable[[RequestOutput], None]) -> None:
    """Step the engine until idle, handing each finished request to on_output as it finishes."""
    bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
    last = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                on_output(out)
                bar.update(1)
            now = time.perf_counter()
            if use_tqdm and now - last > 0.5:
                s = engine.stats
                bar.set_postfix(prefill=f"{s.prefill_tokens / max(s.prefill_time, 1e-9):.0f}tok/s",
                                decode=f"{s.decode_tokens / max(s.decode_time, 1e-9):.0f}tok/s", refresh=False)
                last = now
    finally:
        bar.close()
