"""The replica driver: how every rank of a job takes part in one run of requests.

Every rank runs the same program (torchrun). The leader of each DP replica takes requests
from the job's dispenser as its scheduler runs short (parallel/work_queue.py: replicas finish
together whatever the requests' lengths), steps the engine until idle and hands each finished
request to a callback; the other ranks of its replica follow the leader's step plans. Used by
`LLM.generate` and by the batch job alike.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

from tqdm.auto import tqdm

from seesaw_mc.core.prefix_order import prefix_order
from seesaw_mc.errors import SeesawError
from seesaw_mc.outputs import RequestOutput
from seesaw_mc.sampling_params import SamplingParams


class Request(NamedTuple):
    """What the driver needs of a request (inputs.RequestSpec has the same attributes)."""

    request_id: Any
    prompt_token_ids: List[int]
    params: SamplingParams
    prompt: Optional[str] = None


_RUNS = itertools.count()  # every rank calls drive() in the same order: the same run number everywhere


def drive(engine, requests: Sequence, on_output: Callable[[RequestOutput], None], use_tqdm: bool = False,
          result: Callable[[], Any] = lambda: None) -> list:
    """Serve `requests` (the same list on every rank, already validated) and return every
    replica leader's `result()` once every replica is idle, in replica order, on every rank."""
    run = next(_RUNS)
    if not engine.is_leader:
        return engine.worker_loop()
    if engine.config.cache.enable_prefix_caching:  # requests that share a prefix run together
        order = prefix_order([r.prompt_token_ids for r in requests], engine.config.cache.block_size)
        requests = [requests[i] for i in order]
    if engine.dp_size == 1:
        for r in requests:
            engine.add_request(r.request_id, r.prompt_token_ids, r.params, prompt=r.prompt)

        def work():
            step_until_idle(engine, len(requests), use_tqdm, on_output)
            return [result()]
        return _lead(engine, work)
    from seesaw_mc.parallel.work_queue import WorkQueue, default_store

    queue = WorkQueue(default_store(), run, len(requests), engine.dp_size, engine.dp_rank,
                      engine.config.collective_timeout_s)

    def work():
        step_until_idle(engine, 0, use_tqdm, on_output, feed=lambda bar: _top_up(engine, queue, requests, bar),
                        beat=queue.beat)
        local = result()  # e.g. the batch job closes its output file here, before it reports done
        queue.finish(engine.keepalive)
        return engine.gather_across_replicas(local)  # every replica is done: no one waits long here

    return _lead(engine, work)


def _top_up(engine, queue, requests: Sequence, bar) -> None:
    """Before each step, keep as many requests waiting as the scheduler could start in one step
    (max_num_seqs): with top-ups before every step, the scheduler never runs out of waiting
    prompts while the dispenser has some (a Seesaw prefill phase runs as long as with the whole
    queue in hand), and what a replica holds but has not started stays small (balance)."""
    got = queue.take(engine.config.scheduler.max_num_seqs - engine.num_waiting)
    for i in got:
        r = requests[i]
        engine.add_request(r.request_id, r.prompt_token_ids, r.params, prompt=r.prompt)
    if got:
        bar.total = (bar.total or 0) + len(got)
        bar.refresh()


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


def step_until_idle(engine, total: int, use_tqdm: bool, on_output: Callable[[RequestOutput], None],
                    feed: Callable[[Any], None] = lambda bar: None, beat: Callable[[], None] = lambda: None) -> None:
    """Step the engine until idle, handing each finished request to on_output as it finishes;
    `feed(bar)` adds requests before each step, `beat()` tells the other replicas it is alive."""
    bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
    last = time.perf_counter()
    try:
        feed(bar)
        while engine.has_unfinished_requests():
            for out in engine.step():
                on_output(out)
                bar.update(1)
            beat()
            feed(bar)
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
