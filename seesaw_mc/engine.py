"""The engine loop: schedule -> run the step on the replica -> update_from_output -> outputs."""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence as Seq

import torch

from seesaw_mc.config import EngineConfig
from seesaw_mc.core.block_manager import BlockManager
from seesaw_mc.core.scheduler import Phase, Scheduler
from seesaw_mc.core.seesaw_policy import SeesawScheduler
from seesaw_mc.core.sequence import Sequence
from seesaw_mc.core.step_plan import PlanBuilder, SequenceMirror, StepPlan
from seesaw_mc.errors import CapacityError, InputError, SeesawError
from seesaw_mc.model_spec import load_model_args
from seesaw_mc.outputs import RequestOutput, StopRules, completion_output
from seesaw_mc.preflight import check_layouts, check_prompt, context_limit, load_tokenizer, resolve_dtype
from seesaw_mc.sampling import step_seed
from seesaw_mc.sampling_params import SamplingParams

log = logging.getLogger("seesaw_mc")
TIMELINE_STEPS = 100_000

def _stable_hash(value) -> int:
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little")


@dataclass
class _Request:
    request_id: Any
    prompt: Optional[str]
    prompt_token_ids: List[int]
    params: SamplingParams
    seqs: List[Sequence]
    arrival_time: float
    first_token_time: Optional[float] = None


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_time: float = 0.0
    decode_tokens: int = 0
    decode_time: float = 0.0
    steps: Dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    preemptions: int = 0
    """Read from the scheduler, the one counter (a swap to the host tier counts as one)."""
    timeline: Deque[tuple] = field(default_factory=lambda: deque(maxlen=TIMELINE_STEPS))
    """Per step: (start, seconds, phase, batch size, device tier use, host tier use); the
    newest TIMELINE_STEPS steps, so that a long job's memory stays flat."""

    def as_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_time_s": self.prefill_time,
            "decode_tokens": self.decode_tokens, "decode_time_s": self.decode_time,
            "prefill_steps": self.steps["prefill"], "decode_steps": self.steps["decode"],
            "preemptions": self.preemptions,
        }


class LLMEngine:
    """Every rank builds one; the leader of each DP replica schedules and the others follow
    its step plans (worker_loop)."""

    def __init__(self, config: EngineConfig):
        from seesaw_mc.worker.runner import ModelRunner
        from seesaw_mc.parallel import megatron_adapter as mc

        self.config = config
        self.args = args = load_model_args(config.model)
        allreduce = check_layouts(config, args)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.dtype = resolve_dtype(config.dtype, args, mc.HAS_CUDA)
        self.eos_token_ids = set(args.eos_token_ids)
        if not self.eos_token_ids and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = {self.tokenizer.eos_token_id}
        max_len = self.context_len = context_limit(args, config.max_model_len)
        mc.init_distributed(timeout_s=config.collective_timeout_s)
        layouts = {"prefill": config.prefill_layout, "decode": config.decode_layout}
        self.runner = ModelRunner(config, args, self.dtype, max_len, layouts, allreduce)
        bs = config.cache.block_size
        capacity = self.runner.num_blocks * bs
        if self.runner.switching:
            capacity = min(capacity, self.runner.num_host_blocks * bs)
        if capacity < max_len:
            if config.max_model_len is not None:
                raise CapacityError(
                    f"max_model_len {max_len} does not fit the KV cache ({capacity} tokens in blocks of {bs}); "
                    f"raise the cache size or lower max_model_len")
            if int(os.environ.get("RANK", "0")) == 0:
                log.warning("the KV cache holds %d tokens per sequence, less than the model's context of %d: "
                            "max_model_len is capped to %d (longer requests stop with finish_reason 'length'; "
                            "raise the KV tiers to lift it)", capacity, max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.is_leader = self.runner.is_leader
        self.dp_size = config.prefill_layout.dp
        self.dp_rank = self.runner.groups["prefill"].dp_rank
        caching = config.cache.enable_prefix_caching
        device = BlockManager(self.runner.num_blocks, bs, enable_caching=caching)
        stop = StopRules(self.tokenizer, self.eos_token_ids, max_len)
        sc = config.scheduler
        if self.runner.switching:
            # Two layouts: the host tier holds KV between phases; schedule for few transitions.
            host = BlockManager(self.runner.num_host_blocks, bs, table="host_block_table", enable_caching=caching)
            self.scheduler = SeesawScheduler(device, host, sc.max_num_seqs, sc.max_num_batched_tokens,
                                             sc.decode_watermark, stop_check=stop)
        else:
            self.scheduler = Scheduler(device, sc.max_num_seqs, sc.max_num_batched_tokens, stop_check=stop)
        self.watchdog = None
        if torch.distributed.get_world_size() > 1:
            from seesaw_mc.parallel.procs import Watchdog

            self.watchdog = Watchdog(config.collective_timeout_s)
        # Steps issued whose tokens are not back: up to `depth` of them under pipeline parallelism.
        self._in_flight: Deque[tuple] = deque()
        self._depth = {name: sc.pipeline_depth or lay.pp for name, lay in layouts.items()}
        self._pp = {name: lay.pp for name, lay in layouts.items()}
        self.scheduler.decode_groups = self._depth["decode"]
        self.plans = PlanBuilder()
        self.mirror = SequenceMirror()
        self.requests: Dict[Any, _Request] = {}
        self.stats = EngineStats()

    @property
    def transitions(self) -> List[dict]:
        return self.runner.transitions

    def metrics(self, since: Optional[dict] = None) -> dict:
        """The run's record so far: engine counters, layout transitions, KV copies between the
        tiers, the step timeline, cache sizes. With `since` (an earlier record), counters and
        transitions cover only what came after it. The one source for the CLI, the benchmarks
        and the tests."""
        rec = {"engine": self.stats.as_dict(), "transitions": list(self.transitions),
               "swap": self.runner.kv.summary(since=since["swap"] if since else None),
               "timeline": list(self.stats.timeline), "allreduce": self.runner.allreduce,
               "device_blocks": self.runner.num_blocks, "host_blocks": self.runner.num_host_blocks,
               "prefix_cache": self.prefix_cache_counters()}
        if since:
            rec["engine"] = {k: v - since["engine"][k] for k, v in rec["engine"].items()}
            rec["prefix_cache"] = {k: v - since["prefix_cache"][k] for k, v in rec["prefix_cache"].items()}
            rec["transitions"] = rec["transitions"][len(since["transitions"]):]
            rec["timeline"] = rec["timeline"][len(since["timeline"]):]
        return rec

    def prefix_cache_counters(self) -> dict:
        """Prefix sharing so far: prompt tokens not computed, and per tier the full blocks looked
        up at allocation and those found cached (hit rate = hit / queried)."""
        rec = {"prefill_tokens_saved": self.scheduler.prefill_tokens_saved}
        tiers = self.scheduler.tiers
        for name in ("device", "host"):  # both keys always: metrics(since=...) subtracts them
            rec[f"{name}_queried_blocks"] = tiers[name].queried_blocks if name in tiers else 0
            rec[f"{name}_hit_blocks"] = tiers[name].hit_blocks if name in tiers else 0
        return rec

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix in both tiers (vLLM's reset_prefix_cache), e.g. so that a
        benchmark's repeat of the same requests computes them again. False while requests run."""
        if self.has_unfinished_requests():
            return False
        for bm in self.scheduler.tiers.values():
            bm.drop_cache()
        return True

    # -- requests ---------------------------------------------------------------------
    def add_request(self, request_id, prompt_token_ids: Seq[int], params: SamplingParams,
                    prompt: Optional[str] = None) -> None:
        ids = self.validate_prompt(request_id, prompt_token_ids)
        # Unseeded requests get a seed derived from the engine seed and their id, so a rerun
        # (or a resumed job) samples the same tokens whatever the batching.
        base_seed = params.seed if params.seed is not None else step_seed(self.config.seed, _stable_hash(request_id))
        seqs = [Sequence(request_id, i, ids, params, seed=base_seed if i == 0 else step_seed(base_seed, -i - 1))
                for i in range(params.n)]
        self.requests[request_id] = _Request(request_id, prompt, ids, params, seqs, time.perf_counter())
        for s in seqs:
            self.scheduler.add(s)

    def validate_prompt(self, request_id, prompt_token_ids: Seq[int]) -> List[int]:
        """Raise the one-line error add_request would raise, without adding anything."""
        if request_id in self.requests:
            raise InputError(f"duplicate request id {request_id!r}")
        ids = check_prompt(request_id, prompt_token_ids, self.args.vocab_size, self.context_len)
        if len(ids) >= self.max_model_len:
            raise CapacityError(f"request {request_id!r}: prompt of {len(ids)} tokens can never fit the KV cache "
                                f"({self.max_model_len} tokens); raise num_host_blocks / host_memory_bytes or the "
                                f"device KV budget")
        return ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_waiting(self) -> int:
        """Sequences queued and not started (or preempted back to the queue)."""
        return len(self.scheduler.waiting)

    # -- one step -----------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Leader: schedule, tell the replica, run the step (this rank's stage of it), hand the
        tokens of the oldest step in flight to the scheduler, collect finished requests.
        Under pipeline parallelism up to `depth` steps are in flight: the next step's stage 0
        runs while later stages finish the last one, whose tokens come back meanwhile."""
        if self.watchdog:
            self.watchdog.beat()
        out = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.num_preemptions
        plan = self.plans.plan_step(out)
        if plan is None:  # nothing to issue now: wait for the oldest step in flight, if any
            return self._collect() if self._in_flight else []
        if out.phase is Phase.DECODE and self.scheduler.decode_groups > 1:
            # One group per step: the groups in flight fill the pipeline, not micro-batches.
            plan.num_microbatches = max(1, self._pp["decode"] // self.scheduler.decode_groups)
        self.runner.send_plan(plan)
        t0 = time.perf_counter()
        pending = self.runner.execute(plan, out.seqs)
        self._record_step(out, time.perf_counter() - t0)
        self._in_flight.append((out, pending))
        finished: List[RequestOutput] = []
        while len(self._in_flight) >= self._depth[plan.kind]:
            finished += self._collect()
        return finished

    def _collect(self) -> List[RequestOutput]:
        """The oldest step in flight: its tokens to the scheduler; the requests it finished."""
        out, pending = self._in_flight.popleft()
        done = self.scheduler.update_from_output(out, self.runner.result(pending))
        self.plans.after_step(out, done)
        finished: List[RequestOutput] = []
        for seq in done:
            req = self.requests.get(seq.request_id)  # None: a sibling of this step completed it
            if req is not None and all(s.is_finished for s in req.seqs):
                finished.append(self._make_output(self.requests.pop(seq.request_id)))
        return finished

    def _record_step(self, out, dt: float) -> None:
        host = self.scheduler.tiers.get("host")
        self.stats.timeline.append((time.time() - dt, dt, out.phase.value, len(out.seqs), self.scheduler.bm.usage,
                                    host.usage if host is not None else 0.0))
        self.stats.steps[out.phase.value] += 1
        if out.phase is Phase.PREFILL:
            self.stats.prefill_tokens += out.num_tokens
            self.stats.prefill_time += dt
        else:
            self.stats.decode_tokens += len(out.seqs)
            self.stats.decode_time += dt

    def worker_loop(self):
        """Non-leader ranks: follow the leader's plans until it says stop; returns its payload."""
        while True:
            if self.watchdog:
                self.watchdog.beat()
            plan = self.runner.receive_plan()
            if plan.kind == "idle":
                continue
            if plan.kind == "stop":
                if self.watchdog:
                    self.watchdog.disarm()
                if isinstance(plan.payload, SeesawError):
                    raise plan.payload
                self.runner.flush()
                return plan.payload
            self.runner.execute(plan, self.mirror.apply(plan))

    def gather_across_replicas(self, obj) -> list:
        """Leaders only: every DP replica leader's `obj`, in replica order."""
        import torch.distributed as dist

        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.runner.groups["prefill"].control_dp)
        return out

    def keepalive(self) -> None:
        """Leader, while its replica is idle but the run is not over (other replicas still
        working): tell the followers, whose watchdogs and collectives would time out."""
        if self.watchdog:
            self.watchdog.beat()
        self.runner.send_plan(StepPlan("idle"))

    def finish_run(self, payload=None):
        """Leader: release the workers from worker_loop, handing them `payload`."""
        self.runner.send_plan(StepPlan("stop", payload=payload))
        self.runner.flush()  # with the watchdog armed: a follower that hangs cannot hold us here
        if self.watchdog:
            self.watchdog.disarm()
        return payload

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = [completion_output(s, self.tokenizer) for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             metrics={"arrival_time": req.arrival_time, "finished_time": time.perf_counter()})
