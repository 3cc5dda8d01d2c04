"""ModelRunner: one rank's side of a step. It takes the step's plan, makes the KV copies
and the layout switch it asks for, runs the micro-batches through this rank's pipeline stage,
samples on the last stage, and gives the leader the tokens.

Start-up builds the pieces it drives: the two layouts' shards (worker/reshard.py), the KV
tiers (worker/kv_tiers.py) and the TP all-reduce (parallel/deepspeed_ops.py)."""
from __future__ import annotations

import logging
import pickle
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from seesaw_mc.config import Layout
from seesaw_mc.core.scheduler import RunnerOutput
from seesaw_mc.core.step_plan import StepPlan, num_microbatches, split_microbatches, split_prefill
from seesaw_mc.model.cpu_linear import select_linear
from seesaw_mc.model.attention import decode_metadata, prefill_metadata, set_attn_metadata
from seesaw_mc.model_spec import ModelArgs
from seesaw_mc.model.kernels import select_kernels
from seesaw_mc.model.lockstep import forward_lockstep
from seesaw_mc.parallel import megatron_adapter as mc
from seesaw_mc.parallel.megatron_adapter import release_sends
from seesaw_mc.parallel.deepspeed_ops import start_tp_allreduce
from seesaw_mc.parallel.procs import fault_point
from seesaw_mc.sampling import Sampler
from seesaw_mc.worker.cpu_memory import keep_freed_memory
from seesaw_mc.worker.device_cache import allocate_device_kv
from seesaw_mc.worker.kv_tiers import KVTiers
from seesaw_mc.worker.node_files import job_files
from seesaw_mc.worker.reshard import Resharder

log = logging.getLogger("seesaw_mc")


class PendingTokens:
    """A step's tokens still on their way from the sampling stage (global rank `sampler`)."""

    def __init__(self, sampler: int):
        self.sampler = sampler


class ObjectChannel:
    """Pickled objects from one rank to another over `group`, in order. Sends are
    asynchronous: the sender goes on at once and keeps each message until it is delivered;
    the receiver blocks until the next message is here. Two uses: step plans from the leader
    to the other ranks of its replica, and sampled tokens from the last pipeline stage to the
    leader. Unlike a broadcast, a stage busy with an earlier step does not hold up the leader:
    the plan waits for it in the channel (steps in flight)."""

    def __init__(self, group, tag: int):
        self.group, self.tag = group, tag
        self._sends: List[tuple] = []  # (work, tensor) pairs, oldest first

    def send(self, obj, dst: int) -> None:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.long)
        self._sends += [(dist.isend(t, dst, group=self.group, tag=self.tag), t) for t in (size, data)]
        release_sends(self._sends)

    def wait_sent(self) -> None:
        release_sends(self._sends, keep=0)

    def receive(self, src: int):
        size = torch.empty(1, dtype=torch.long)
        dist.recv(size, src, group=self.group, tag=self.tag)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src, group=self.group, tag=self.tag)
        return pickle.loads(data.numpy().tobytes())  # from our own job's leader or sampler (as recv_object_list)


class ModelRunner:
    def __init__(self, config, args: ModelArgs, dtype: torch.dtype, max_model_len: int, layouts: Dict[str, Layout],
                 allreduce: str = "gloo"):
        self.args = args
        self.device = mc.default_device()
        self.block_size = config.cache.block_size
        self.rank = dist.get_rank()
        reuse = keep_freed_memory(self.device.type)
        if self.rank == 0:
            log.info("freed activation memory kept in the process (glibc mallopt): %s", reuse)
        # The kernel choice is an RMSNorm's; LayerNorm models (GPT-2) run torch's norm.
        kernels = select_kernels(config.kernels if args.normalization == "RMSNorm" else "torch", self.device, dtype,
                                 args.hidden_size, args.norm_eps, log_once=self.rank == 0)
        with job_files() as job:  # the job's shared files exist only within this block
            linear = select_linear(config.kernels, self.device, dtype, log_once=self.rank == 0)
            self.weights = Resharder(config, args, dtype, self.device, max_model_len, layouts, job, kernels, linear)
            self.allreduce, self.shm_allreduce = start_tp_allreduce(allreduce)
            # DeepSpeed's shm all-reduce is CPU work: in lockstep it would be moved, not hidden.
            self.tp_overlap = config.tp_overlap and self.shm_allreduce is None and not args.linear_bias
            self.lockstep_groups = 0  # micro-batch groups run by forward_lockstep (tests, A/B runs)
            first = self.weights.groups["prefill"]
            self.replica_group = first.control_mp  # plans and sampled tokens: control traffic
            self.leader_rank = first.dp_rank * first.layout.tp * first.layout.pp
            self.is_leader = self.rank == self.leader_rank
            # Weights first: on CUDA the KV budget is what is free once they are loaded.
            num_blocks, buffer = allocate_device_kv(config, args, self.weights.groups, dtype, self.device,
                                                    max_model_len, self.weights.resident_bytes())
            self.kv = KVTiers(config, args, dtype, self.device, self.weights.groups, self.weights.models, num_blocks,
                              buffer, job, mc.local_world_size(dist.get_world_size()))
        self.sampler = Sampler()
        self._tokens = ObjectChannel(self.replica_group, tag=2)
        self._plans = ObjectChannel(self.replica_group, tag=1)
        self._followers = [r for r in dist.get_process_group_ranks(self.replica_group) if r != self.leader_rank]

    # What the engine, the benchmarks and the tests read of a rank.
    @property
    def models(self):
        return self.weights.models

    @property
    def groups(self):
        return self.weights.groups

    @property
    def kv_views(self):
        return self.kv.views

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_host_blocks(self) -> int:
        return self.kv.num_host_blocks

    @property
    def switching(self) -> bool:
        return self.weights.switching

    @property
    def transitions(self) -> List[dict]:
        return self.weights.transitions

    def activate(self, name: str, release_host=()) -> Optional[dict]:
        """Switch layouts; the old layout's copies to the host tier finish first, then the
        pages of host blocks no one uses go back to the OS (`release_host` runs)."""
        def drain():
            self.kv.wait_all()
            self.kv.release_host(release_host)

        rec = self.weights.activate(name, drain_kv=drain)
        self.kv.layout = name
        return rec

    # -- one step ---------------------------------------------------------------------------
    def _prepare(self, is_prefill: bool, seqs) -> tuple:
        dev, bs = self.device, self.block_size
        if is_prefill:
            # Pieces of prompts after what their blocks hold already: a cached prefix, or the
            # piece an earlier micro-batch of this step computed.
            ids = [t for p in seqs for t in p.seq.token_ids[p.start:p.stop]]
            meta = prefill_metadata([p.seq.block_table for p in seqs], [p.stop - p.start for p in seqs],
                                    [p.start for p in seqs], bs, dev, sample=[p.samples for p in seqs])
            return torch.tensor(ids, device=dev), meta
        else:
            # Rows arrive sorted by length (see execute): the gather fallback pads per group.
            ids = [s.last_token for s in seqs]
            meta = decode_metadata([s.block_table for s in seqs], [len(s) for s in seqs], bs, dev)
        return torch.tensor(ids, device=dev), meta

    def execute(self, plan: StepPlan, seqs) -> Optional[RunnerOutput]:
        """One step as planned: finish the copies it waits for, swap KV out (in the layout
        that wrote it), switch layouts if the step's phase runs in another, swap KV in, run the
        phase over `seqs` while prefetching, then offload prefilled KV to the host tier. The
        leader gets the sampled tokens; other ranks get None."""
        self.kv.wait(plan.wait_for)
        self.kv.swap_out(plan.swap_out)
        if plan.kind != self.weights.active:  # layouts are named after the phase they run
            self.activate(plan.kind, release_host=plan.release_host)
        with torch.inference_mode():
            return self._compute(plan, seqs)

    def _compute(self, plan: StepPlan, seqs) -> Optional[RunnerOutput]:
        self.kv.swap_in(plan.swap_in)
        self.kv.prefetch(plan.prefetch, plan.prefetch_ticket)
        if not seqs:
            return RunnerOutput([], []) if self.is_leader else None
        is_prefill = plan.kind == "prefill"
        if is_prefill:
            fault_point("prefill")
        g = self.groups[self.weights.active]
        model = self.models[self.weights.active]
        order = None
        if not is_prefill and len(seqs) > 1:
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            seqs = [seqs[i] for i in order]
        results = []
        # megatron-core's TP collectives allocate on torch.cuda.current_device().
        with mc.cpu_device_shim():
            self._run_microbatches(plan, is_prefill, seqs, g, model, results)
        self.kv.offload(plan.offload, plan.offload_ticket)
        out = None
        if results:
            toks = [t for r in results for t in r[0]]
            lps = [lp for r in results for lp in r[1]]
            if order is not None:  # back to the caller's order
                toks_o, lps_o = [0] * len(toks), [None] * len(lps)
                for j, i in enumerate(order):
                    toks_o[i], lps_o[i] = toks[j], lps[j]
                toks, lps = toks_o, lps_o
            out = RunnerOutput(toks, lps)
        sampler = g.sampler_rank
        if sampler != self.leader_rank:
            if self.rank == sampler:
                self._tokens.send(out, self.leader_rank)
            # The leader takes them later (result()): it may issue the next step first.
            return PendingTokens(sampler) if self.is_leader else None
        return out if self.is_leader else None

    def result(self, pending) -> RunnerOutput:
        """Leader: a step's tokens; waits for the sampling stage if they are not here yet."""
        if isinstance(pending, PendingTokens):
            return self._tokens.receive(pending.sampler)
        return pending

    def flush(self) -> None:
        """Every message and activation this rank sent delivered (before it leaves its loop, or
        the leader after its last plan)."""
        self._tokens.wait_sent()
        self._plans.wait_sent()
        for g in self.groups.values():
            g.wait_sends()

    def _run_microbatches(self, plan, is_prefill, seqs, g, model, results) -> None:
        try:
            n = plan.num_microbatches or num_microbatches(g.layout.pp, is_prefill,
                                                          sum(len(s) - s.num_cached_tokens for s in seqs))
            k = 2 if self.tp_overlap and is_prefill and g.layout.tp > 1 else 1  # in lockstep (model/lockstep.py)
            batches = split_prefill(seqs, n * k) if is_prefill else split_microbatches(seqs, n * k)
            groups = [batches[i:i + k] for i in range(0, len(batches), k)]
            rows = [sum(p.stop - p.start for mb in grp for p in mb) if is_prefill else sum(map(len, grp))
                    for grp in groups]
            # Later stages receive each micro-batch's activations while computing the one before.
            recv = None if g.is_first_stage else g.recv_forward((rows[0], self.args.hidden_size))
            for i, grp in enumerate(groups):
                prepared = [self._prepare(is_prefill, mb) for mb in grp]
                hidden = None
                if recv is not None:
                    hidden = recv()
                    recv = g.recv_forward((rows[i + 1], self.args.hidden_size)) if i + 1 < len(rows) else None
                if len(grp) == 1:
                    set_attn_metadata(prepared[0][1])
                    hs = [model(prepared[0][0], hidden)]
                else:
                    ids = torch.cat([ids for ids, _ in prepared]) if g.is_first_stage else None
                    hs = forward_lockstep(model, ids, hidden, [meta for _, meta in prepared])
                    self.lockstep_groups += 1
                if not g.is_last_stage:
                    g.send_forward(hs[0] if len(hs) == 1 else torch.cat(hs))
                    continue
                self._sample(is_prefill, grp, prepared, hs, model, g, results)
        finally:
            set_attn_metadata(None)

    def _sample(self, is_prefill, grp, prepared, hs, model, g, results) -> None:
        """Last stage: the next token of each sequence of a micro-batch group whose step ends it."""
        rows, seqs = [], []
        for mb, (_, meta), h in zip(grp, prepared, hs):
            if is_prefill:
                mb = [p.seq for p in mb if p.samples]
                if not mb:  # only pieces of prompts that go on in the next micro-batch
                    continue
            rows.append(h.index_select(0, meta.logits_indices) if meta.logits_indices is not None else h)
            seqs += mb
        if not seqs:
            return
        h = rows[0] if len(rows) == 1 else torch.cat(rows)
        if all(s.params.greedy and s.params.logprobs is None for s in seqs):
            tokens = model.greedy_tokens(h).tolist()  # no logits gathered across TP ranks
            if g.tp_rank == 0:
                results.append((tokens, [None] * len(tokens)))
            return
        logits = model.compute_logits(h)
        if g.tp_rank == 0:
            results.append(self.sampler(logits, seqs))

    def send_plan(self, plan) -> None:
        """Leader -> every other rank of the replica, point to point and without waiting (see
        ObjectChannel)."""
        for r in self._followers:
            self._plans.send(plan, r)

    def receive_plan(self):
        """Follower: the leader's next plan, waiting for it if need be."""
        return self._plans.receive(self.leader_rank)
