"""An analytical cost model of one layout pair, per DP replica (DP never changes between phases):

- Memory. Each device holds its stage's layers (+ embedding on the first stage, LM head on the
  last) split by TP, and the KV of its layers and heads for every resident token. What is left
  of `mem_bytes x mem_util` after the weights is the device KV tier; a layout that leaves no room
  does not fit.
- Prefill (compute bound). FLOPs = 2 x params x tokens + causal attention, shared by tp x pp
  devices at `flops x mfu`; plus, per layer and chunk, two TP all-reduces of tokens x hidden
  (ring: 2(tp-1) x latency + 2(tp-1)/tp x bytes / link_bw), PP sends between stages, one read of
  the stage's weights per chunk, and a pipeline bubble of (pp-1)/micro-batches.
- Decode (weight-read bound). One step advances every resident sequence by a token; under PP the
  batch runs as pp micro-batches, so every stage reads its weights pp times per step. Per
  micro-batch and stage: max(weight + KV reads / mem_bw, FLOPs / flops) + the TP all-reduces
  and the PP send. The batch is what the device KV tier holds (at the mean final context) or
  max_num_seqs.
- Seesaw pairs. Prefill in one layout until the host tier is full, then decode in the other
  until it is drained: 2 x cycles - 1 transitions, each copying the new layout's shard from the
  host master copy (host_bw) + a fixed drain/barrier cost. KV offload (prefill) and swap-in
  (decode) go over host_bw and overlap compute: a phase takes the longer of the two.
  A static layout runs both phases in its one layout with no host tier.

The figures are first-order (no kernel efficiency curves, no overlap of all-reduce with compute):
the model is meant to rank layouts, not to predict seconds (ranking.py ranks them).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

from seesaw_mc.config import Layout
from seesaw_mc.model_spec import ModelShape
from seesaw_mc.planner.hardware import GiB, Hardware
from seesaw_mc.planner.workload import Workload
from seesaw_mc.core.step_plan import num_microbatches


@dataclass
class Estimate:
    prefill: Layout
    decode: Layout
    fits: bool
    why: str = ""
    tokens_per_s: float = 0.0
    total_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    transitions: int = 0
    transition_s: float = 0.0
    decode_batch: int = 0
    device_kv_tokens: Dict[str, int] = field(default_factory=dict)
    host_kv_tokens: int = 0

    @property
    def label(self) -> str:
        return paper_name(self.prefill) if self.prefill == self.decode else \
            f"{paper_name(self.prefill)}->{paper_name(self.decode)}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill=str(self.prefill), decode=str(self.decode), label=self.label)
        return d


def paper_name(lay: Layout) -> str:
    """The paper's notation: D2P4, T4P2, T1."""
    s = (f"D{lay.dp}" if lay.dp > 1 else "") + (f"T{lay.tp}" if lay.tp > 1 else "") + (f"P{lay.pp}" if lay.pp > 1 else "")
    return s or "T1"


LOCKSTEP_EXPOSED = 0.6
"""Share of a TP prefill's all-reduce time (as modelled) still exposed under tp_overlap (measured,
see prefill_s)."""


class CostModel:
    def __init__(self, model: ModelShape, hw: Hardware, world: int, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, host_kv_bytes: Optional[float] = None,
                 tp_overlap: bool = False):
        self.m, self.hw, self.world = model, hw, world
        self.tp_overlap = tp_overlap
        """TP prefill runs micro-batches in lockstep, all-reduces behind compute (EngineConfig.tp_overlap)."""
        self.max_num_seqs = max_num_seqs
        self.chunk = max_num_batched_tokens
        nodes = max(1, math.ceil(world / hw.gpus_per_node))
        self.host_kv_bytes = host_kv_bytes if host_kv_bytes is not None else \
            nodes * hw.host_mem_bytes * hw.host_kv_fraction

    # ---- per-device quantities -------------------------------------------------------------
    def stage_layers(self, lay: Layout) -> int:
        return math.ceil(self.m.layers / lay.pp)

    def stage_params(self, lay: Layout) -> float:
        """Parameters of the largest stage on one TP rank."""
        return self.m.shard_bytes(lay) / self.m.dtype_bytes

    def weight_bytes(self, lay: Layout) -> float:
        return self.m.shard_bytes(lay)

    def device_kv_tokens(self, lay: Layout) -> int:
        """Tokens of KV one replica's device tier holds (every device holds its share of each)."""
        hw = self.hw
        act = 0.04 * hw.mem_bytes  # activations and workspace
        free = hw.mem_bytes * hw.mem_util - self.weight_bytes(lay) - act
        per_tok = self.m.kv_bytes_per_token(lay.tp, self.stage_layers(lay))
        return max(0, int(free // per_tok))

    def allreduce_s(self, nbytes: float, n: int, calls: float = 1.0) -> float:
        if n <= 1:
            return 0.0
        return calls * 2 * (n - 1) * self.hw.link_latency + 2 * (n - 1) / n * nbytes / self.hw.link_bw

    def p2p_s(self, nbytes: float, calls: float = 1.0) -> float:
        return calls * self.hw.link_latency + nbytes / self.hw.link_bw

    # ---- phases ------------------------------------------------------------------------------
    def prefill_s(self, lay: Layout, wl: Workload, n_req: float) -> float:
        m, hw = self.m, self.hw
        tokens = n_req * wl.unique_in  # a shared prefix is computed once
        sq = n_req * sum(i * i for i, _ in wl.lengths) / wl.n
        flops = 2 * m.layers * m.layer_params * tokens + 2 * m.layers * m.heads * m.head_dim * sq \
            + 2 * m.vocab * m.hidden * n_req  # the LM head only for each prompt's last token
        compute = flops / (lay.tp * lay.pp * hw.flops * hw.mfu)
        steps = max(1.0, tokens / self.chunk)
        act = tokens * m.hidden * m.dtype_bytes
        ar = self.stage_layers(lay) * 2 * self.allreduce_s(act, lay.tp, calls=steps)
        send = self.p2p_s(act, calls=steps) if lay.pp > 1 else 0.0
        reads = steps * self.weight_bytes(lay) / hw.mem_bw
        if self.tp_overlap and lay.tp > 1:
            # Two micro-batches in lockstep: each reads the weights, and each all-reduce runs while
            # the other computes, but only partly off the critical path (gloo's work shares the
            # core). Test bed, tp2 at 418 Mbit/s, one core per host, prefill only: sharegpt-like
            # (one 2152-token step) 5.3-5.5 s in lockstep, 7.5-7.7 s without, pp2 4.3-4.7 s, where
            # this model has 3.7 s of compute and 2.7 s of all-reduce; arxiv-like (4999 tokens)
            # 12.6-13.0 s against pp2's 10.4-10.5 (8.7 and 6.3 s modelled). Scaling the compute by
            # pp2's measured/modelled ratio leaves 0.60-0.65 of the modelled all-reduce exposed.
            reads *= 2
            ar = max(ar - compute - reads, LOCKSTEP_EXPOSED * ar)
        # the engine's pipeline fills and drains within each step
        micro = num_microbatches(lay.pp, True, int(min(self.chunk, tokens)))
        return (compute + ar + send + reads) * (micro + lay.pp - 1) / micro

    def decode_batch(self, lay: Layout, wl: Workload, n_req: float) -> int:
        ctx = wl.unique_in + wl.mean_out  # a shared prefix takes its blocks once
        return int(max(0, min(self.max_num_seqs, n_req, self.device_kv_tokens(lay) // max(ctx, 1))))

    def decode_step_s(self, lay: Layout, batch: float, ctx: float) -> float:
        """One decode step of `batch` sequences: `m` micro-batches go through the pp stages and
        the pipeline drains at the end of the step, as the engine runs it."""
        m_ = self.m
        micro_n = max(1, min(lay.pp, math.ceil(batch)))
        micro = batch / micro_n
        kv = micro * ctx * m_.kv_bytes_per_token(lay.tp, self.stage_layers(lay))
        read = (self.weight_bytes(lay) + kv) / self.hw.mem_bw
        flops = 2 * self.stage_params(lay) * micro + \
            4 * self.stage_layers(lay) * (m_.heads / lay.tp) * m_.head_dim * ctx * micro
        stage = max(read, flops / self.hw.flops)
        act = micro * m_.hidden * m_.dtype_bytes
        stage += self.stage_layers(lay) * 2 * self.allreduce_s(act, lay.tp)
        if lay.pp > 1:
            stage += self.p2p_s(act)
        return (micro_n + lay.pp - 1) * stage

    def decode_s(self, lay: Layout, wl: Workload, batch: int, cycles: int = 1) -> float:
        """Continuous batching of this replica's requests, `batch` at a time, in `cycles`
        decode phases that each run until their last sequence ends (the tail, where the batch
        shrinks, is simulated: it dominates when outputs vary a lot)."""
        outs = [o for _, o in wl.lengths][::lay.dp]
        ctx = wl.mean_in + wl.mean_out / 2
        per = math.ceil(len(outs) / cycles)
        total = 0.0
        for c in range(0, len(outs), per):
            pending = iter(outs[c:c + per])
            running = [o for _, o in zip(range(batch), pending)]
            heapq.heapify(running)  # the step at which each running sequence ends
            step = 0
            while running:
                end = running[0]
                total += (end - step) * self.decode_step_s(lay, len(running), ctx)
                step = end
                while running and running[0] == step:
                    heapq.heappop(running)
                    nxt = next(pending, None)
                    if nxt is not None:
                        heapq.heappush(running, step + nxt)
        return total

    def transition_s(self, to: Layout) -> float:
        return self.weight_bytes(to) / self.hw.host_bw + self.hw.transition_overhead_s

    # ---- whole runs -------------------------------------------------------------------------------
    def estimate(self, pre: Layout, dec: Layout, wl: Workload) -> Estimate:
        m, hw = self.m, self.hw
        est = Estimate(pre, dec, fits=False)
        if pre.dp != dec.dp:
            est.why = "DP differs between phases"
            return est
        for lay in {pre, dec}:
            cap = self.device_kv_tokens(lay)
            est.device_kv_tokens[str(lay)] = cap
            if cap <= 0:
                est.why = f"{paper_name(lay)}: weights ({self.weight_bytes(lay) / GiB:.1f} GiB per device) leave no KV room"
                return est
        n_req = wl.n / pre.dp
        batch = self.decode_batch(dec, wl, n_req)
        if batch < 1:
            est.why = f"{paper_name(dec)}: a sequence of {wl.mean_in + wl.mean_out:.0f} tokens does not fit"
            return est
        est.decode_batch = batch
        prefill = self.prefill_s(pre, wl, n_req)
        decode = self.decode_s(dec, wl, batch)
        if pre != dec:
            full_kv = m.kv_bytes_per_token()
            host = self.host_kv_bytes / pre.dp
            est.host_kv_tokens = int(host // full_kv)
            if est.host_kv_tokens < wl.mean_in + wl.mean_out:
                est.why = "host KV tier smaller than one sequence"
                return est
            # The host tier counts unique blocks: a shared prefix is stored once.
            cycles = max(1, math.ceil(n_req * (wl.unique_in + wl.mean_out) / est.host_kv_tokens))
            est.transitions = 2 * cycles - 1
            decode = self.decode_s(dec, wl, batch, cycles)
            est.transition_s = cycles * self.transition_s(dec) + (cycles - 1) * self.transition_s(pre)
            # KV crosses each device's host link once each way; it overlaps the compute
            offload = n_req * wl.unique_in * m.kv_bytes_per_token(pre.tp, self.stage_layers(pre)) / hw.host_bw
            swap_in = n_req * wl.unique_in * m.kv_bytes_per_token(dec.tp, self.stage_layers(dec)) / hw.host_bw
            prefill, decode = max(prefill, offload), max(decode, swap_in)
        est.fits = True
        est.prefill_s, est.decode_s = prefill, decode
        est.total_s = prefill + decode + est.transition_s
        est.tokens_per_s = wl.n * (wl.mean_in + wl.mean_out) / est.total_s
        return est
