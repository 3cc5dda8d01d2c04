"""The replica driver: how every rank of a job takes part in one run of requests.

Every rank runs the same program (torchrun). The leader of each DP replica adds its share of
the requests, steps the engine until idle and hands each finished request to a callback; the
other ranks of its replica follow the leader's step plans. Used by `LLM.generate` and by the
batch job alike.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

from tqdm.auto import tqdm

from seesaw_mc.errors import SeesawError
from seesaw_mc.outputs import RequestOutput
from seesaw_mc.sampling_params import SamplingParams


class Request(NamedTuple):
    """What the driver needs of a request (inputs.RequestSpec has the same attributes)."""

    request_id: Any
    prompt_token_ids: List[int]
    params: SamplingParams
    prompt: Optional[str] = None


def drive(engine, requests: Sequence, on_output: Callable[[RequestOutput], None], use_tqdm: bool = False,
          result: Callable[[], Any] = lambda: None) -> list:
    """Serve `requests` (the same list on every rank, already validated) and return every
    replica leader's `result()` once its replica is idle, in replica order, on every rank."""
    if not engine.is_leader:
        return engine.worker_loop()
    mine = requests[engine.dp_rank::engine.dp_size]  # DP replicas split the requests round-robin
    for r in mine:
        engine.add_request(r.request_id, r.prompt_token_ids, r.params, prompt=r.prompt)

    def work():
        step_until_idle(engine, len(mine), use_tqdm, on_output)
        local = result()
        return engine.gather_across_replicas(local) if engine.dp_size > 1 else [local]

    return _lead(engine, work)


def _lead(engine, work: Callable[[], Any]):
    """Leader: do the work, then release the followers with its result (or its error)."""
    try:
        result = work()
    except SeesawError as e:
        engine.finish_run(e)
        raise
    except BaseException as e:
        engine.finish_run(SeesawError(f"the leader rank failed: {type(e).__name__}: {e}"))
        raise
    engine.finish_run(result)  # followers return it too
    return result


def step_until_idle(engine, total: int, use_tqdm: bool, on_output: Callable[[RequestOutput], None]) -> None:
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


def global_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def on_rank0(fn: Callable[[], Any], default: Any = None) -> Any:
    """Run `fn` on global rank 0 only and give every rank its result. A SeesawError it raises
    is raised on every rank, so that the whole job stops with the same line."""
    value, problem = default, None
    if global_rank() == 0:
        try:
            value = fn()
        except SeesawError as e:
            problem = str(e)
    value, problem = _broadcast_from_rank0((value, problem))
    if problem:
        raise SeesawError(problem)
    return value


def _broadcast_from_rank0(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    from seesaw_mc.parallel.megatron_adapter import control_group

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]
