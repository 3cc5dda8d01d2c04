"""The engine loop: schedule -> run one phase -> sample -> outputs."""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence as Seq

import torch

from seesaw_mc.config import EngineConfig
from seesaw_mc.errors import CapacityError, ConfigError, InputError, ModelError, SeesawError
from seesaw_mc.kv.block_manager import BlockManager
from seesaw_mc.model_spec import ModelArgs, ModelShape, load_model_args
from seesaw_mc.outputs import CompletionOutput, RequestOutput
from seesaw_mc.sampling import step_seed
from seesaw_mc.sampling_params import SamplingParams
from seesaw_mc.scheduler import Phase, Scheduler, SeesawScheduler
from seesaw_mc.sequence import Sequence
from seesaw_mc.step_plan import PlanBuilder, SequenceMirror, StepPlan

log = logging.getLogger("seesaw_mc")
TIMELINE_STEPS = 100_000

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, args: ModelArgs, on_cuda: bool) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if not on_cuda:
        return torch.float32  # CPU matmuls are fastest and exact in fp32
    return _DTYPES.get(args.torch_dtype, torch.bfloat16)


def load_tokenizer(path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... depending on what is missing
            msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ModelError(f"cannot load the tokenizer from {path!r}: {msg}") from None


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


def context_limit(args: ModelArgs, max_model_len: Optional[int]) -> int:
    """Longest prompt + output the model allows (or the user's max_model_len, if smaller)."""
    limit = args.max_position_embeddings
    if args.sliding_window:
        # Beyond the window the model attends differently; stay where we are exact.
        limit = min(limit, args.sliding_window)
    if max_model_len is not None and max_model_len > limit:
        raise ConfigError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens")
    return max_model_len or limit


def check_prompt(request_id, prompt_token_ids: Seq[int], vocab_size: int, context_len: int) -> List[int]:
    """The checks that need only the model's config: non-empty, ids in the vocabulary, fits the context."""
    ids = list(prompt_token_ids)
    if not ids:
        raise InputError(f"request {request_id!r}: empty prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise InputError(f"request {request_id!r}: prompt token ids must be integers in [0, {vocab_size})")
    if len(ids) >= context_len:
        raise InputError(f"request {request_id!r}: prompt of {len(ids)} tokens does not fit the model's "
                         f"context of {context_len} tokens (one token must be left to generate)")
    return ids


def check_layouts(config: EngineConfig, args: ModelArgs) -> str:
    """Reject layouts the model or the launch cannot run, before any collective (so every
    rank fails alike, at once, with the same line). Returns the TP all-reduce backend."""
    for role, lay in (("prefill", config.prefill_layout), ("decode", config.decode_layout)):
        if args.num_heads % lay.tp or args.num_kv_heads % lay.tp:
            raise ConfigError(f"{role} layout {lay}: tp={lay.tp} must divide the model's {args.num_heads} attention "
                              f"heads and {args.num_kv_heads} KV heads")
        if lay.pp > args.num_layers:
            raise ConfigError(f"{role} layout {lay}: pp={lay.pp} exceeds the model's {args.num_layers} layers")
    from seesaw_mc.parallel.deepspeed_ops import choose_allreduce
    from seesaw_mc.parallel.megatron_adapter import HAS_CUDA, local_world_size

    cap = config.cache.device_capacity_bytes
    if cap is not None:
        shape = ModelShape.from_model_args(args, resolve_dtype(config.dtype, args, HAS_CUDA).itemsize)
        for role, lay in (("prefill", config.prefill_layout), ("decode", config.decode_layout)):
            need = shape.shard_bytes(lay)
            if need > cap * config.cache.device_memory_fraction:
                raise ConfigError(f"{role} layout {lay}: its weight shard ({need / 2**30:.2f} GiB per rank) does not "
                                  f"fit the emulated device ({cap / 2**30:.2f} GiB x {config.cache.device_memory_fraction}"
                                  f"); use more tensor or pipeline parallelism")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.world_size:
        raise ConfigError(f"layouts {config.prefill_layout} -> {config.decode_layout} need {config.world_size} ranks "
                          f"but {world} were launched")
    local = local_world_size(world)
    replica = config.prefill_layout.tp * config.prefill_layout.pp
    if config.prefill_layout != config.decode_layout and replica > local:
        raise ConfigError(f"switching layouts needs each DP replica ({replica} ranks) on one node "
                          f"({local} ranks per node here): KV moves through node-local shared memory")
    return choose_allreduce(config.allreduce, HAS_CUDA, world, local,
                            (config.prefill_layout.tp, config.decode_layout.tp))


class LLMEngine:
    """Every rank builds one; the leader of each DP replica schedules and the others follow
    its step plans (worker_loop)."""

    def __init__(self, config: EngineConfig):
        from seesaw_mc.model_runner import ModelRunner
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
        device = BlockManager(self.runner.num_blocks, bs)
        if self.runner.switching:
            # Two layouts: the host tier holds KV between phases; schedule for few transitions.
            host = BlockManager(self.runner.num_host_blocks, bs, table="host_block_table")
            self.scheduler = SeesawScheduler(device, host, config.scheduler.max_num_seqs,
                                             config.scheduler.max_num_batched_tokens, config.scheduler.decode_watermark)
        else:
            self.scheduler = Scheduler(device, config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens)
        self.watchdog = None
        if torch.distributed.get_world_size() > 1:
            from seesaw_mc.parallel.procs import Watchdog

            self.watchdog = Watchdog(config.collective_timeout_s)
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
               "swap": self.runner.swap_summary(since=since["swap"] if since else None),
               "timeline": list(self.stats.timeline), "allreduce": self.runner.allreduce,
               "device_blocks": self.runner.num_blocks, "host_blocks": self.runner.num_host_blocks}
        if since:
            rec["engine"] = {k: v - since["engine"][k] for k, v in rec["engine"].items()}
            rec["transitions"] = rec["transitions"][len(since["transitions"]):]
            rec["timeline"] = rec["timeline"][len(since["timeline"]):]
        return rec

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

    # -- one step -----------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Leader: schedule, tell the replica, run the phase, sample, collect finished requests."""
        if self.watchdog:
            self.watchdog.beat()
        out = self.scheduler.schedule()
        self.stats.preemptions += len(out.preempted)
        for s in out.preempted:
            self.plans.forget(s)
        for s, _ in out.swap_out:  # its device blocks are gone: resent whole when swapped back in
            self.plans.forget(s)
        plan = self.plans.build(out.phase.value, out.seqs)
        plan.swap_out = [p for _, pairs in out.swap_out for p in pairs]
        plan.swap_in = [p for _, pairs in out.swap_in for p in pairs]
        plan.prefetch = [p for _, pairs in out.prefetch for p in pairs]
        plan.offload = [p for _, pairs in out.offload for p in pairs]
        plan.wait_copies = out.wait_copies
        if not out.seqs and not plan.swap_out and not plan.swap_in and not plan.prefetch:
            return []
        self.runner.broadcast_plan(plan)
        t0 = time.perf_counter()
        tokens, logprobs = self._run_plan(plan, out.seqs)
        dt = time.perf_counter() - t0
        host = getattr(self.scheduler, "host", None)
        self.stats.timeline.append((time.time() - dt, dt, out.phase.value, len(out.seqs), self.scheduler.bm.usage,
                                    host.usage if host is not None else 0.0))
        self.stats.steps[out.phase.value] += 1
        if out.phase is Phase.PREFILL:
            self.stats.prefill_tokens += out.num_tokens
            self.stats.prefill_time += dt
        else:
            self.stats.decode_tokens += len(out.seqs)
            self.stats.decode_time += dt
        finished: List[RequestOutput] = []
        for seq, tok, lp in zip(out.seqs, tokens, logprobs):
            seq.token_ids.append(tok)
            if lp is not None:
                seq.cumulative_logprob += lp[0]
                seq.logprobs.append(lp[1])
            if self._check_stop(seq, tok):
                self.scheduler.finish(seq)
                self.plans.forget(seq)
                req = self.requests[seq.request_id]
                if all(s.is_finished for s in req.seqs):
                    finished.append(self._make_output(self.requests.pop(seq.request_id)))
        if out.offload:  # prefilled prompts now live in the host tier
            for s in out.seqs:
                self.plans.forget(s)
            self.scheduler.after_prefill(out.seqs)
        return finished

    def _run_plan(self, plan: StepPlan, seqs):
        # Swap-outs read the device KV in the layout that wrote it: before any transition.
        self.runner.swap_out(plan.swap_out)
        if plan.kind != self.runner.active:  # layouts are named after the phase they run
            self.runner.activate(plan.kind)
        return self.runner.execute(plan.kind == "prefill", seqs, swap_in=plan.swap_in, offload=plan.offload,
                                   prefetch=plan.prefetch, wait_copies=plan.wait_copies)

    def worker_loop(self):
        """Non-leader ranks: follow the leader's plans until it says stop; returns its payload."""
        while True:
            if self.watchdog:
                self.watchdog.beat()
            plan = self.runner.broadcast_plan()
            if plan.kind == "stop":
                if self.watchdog:
                    self.watchdog.disarm()
                if isinstance(plan.payload, SeesawError):
                    raise plan.payload
                return plan.payload
            self._run_plan(plan, self.mirror.apply(plan))

    def gather_across_replicas(self, obj) -> list:
        """Leaders only: every DP replica leader's `obj`, in replica order."""
        import torch.distributed as dist

        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=self.runner.groups["prefill"].pgs.dp)
        return out

    def finish_run(self, payload=None):
        """Leader: release the workers from worker_loop, handing them `payload`."""
        if self.watchdog:
            self.watchdog.disarm()
        self.runner.broadcast_plan(StepPlan("stop", payload=payload))
        return payload

    def _check_stop(self, seq: Sequence, tok: int) -> bool:
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

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.text
            if text is None:
                text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=s.params.skip_special_tokens)
            lps = None
            if s.params.logprobs is not None:
                lps = s.logprobs
                for entry in lps:
                    for tid, lp in entry.items():
                        lp.decoded_token = self.tokenizer.decode([tid])
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=s.output_token_ids,
                cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                logprobs=lps, finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                num_preemptions=s.num_preemptions))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             metrics={"arrival_time": req.arrival_time, "finished_time": time.perf_counter()})
