"""Layout planner: rank static layouts and (prefill, decode) pairs by predicted throughput.

An analytical cost model, per DP replica (DP never changes between phases):

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
the model is meant to rank layouts, not to predict seconds. `seesaw-mc plan` prints the ranking;
`seesaw-mc generate --layouts auto` runs the top entry.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from seesaw_mc.config import Layout
from seesaw_mc.errors import ConfigError
from seesaw_mc.core.step_plan import num_microbatches

GiB = 2 ** 30
GLOO_LINK = (0.9e9, 3e-4)
"""Loopback gloo between CPU ranks (bytes/s, s per hop): DESIGN.md and benchmarks/results/allreduce.txt
(4 KB all-reduce of 2 ranks 632 us = 2 hops)."""
SHM_LINK = (4.8e9, 1.6e-6)
"""DeepSpeed's shared-memory all-reduce on one host (benchmarks/results/allreduce.txt: 16 MB at 4.8 GB/s, 4 KB in 3.2 us)."""


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer (Llama family)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int = 0
    tied: bool = False
    dtype_bytes: int = 2

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        hd = self.head_dim
        attn = self.hidden * hd * (self.heads + 2 * self.kv_heads) + self.heads * hd * self.hidden
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2)

    def kv_bytes_per_token(self, tp: int = 1, layers: Optional[int] = None) -> int:
        """K and V of one token on one TP rank of `layers` layers (KV heads replicate when tp > kv_heads)."""
        heads = max(1, self.kv_heads // tp) if tp <= self.kv_heads else 1
        return 2 * (self.layers if layers is None else layers) * heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_model_args(cls, args, dtype_bytes: int) -> "ModelShape":
        return cls(name="model", layers=args.num_layers, hidden=args.hidden_size, ffn=args.ffn_hidden_size,
                   heads=args.num_heads, kv_heads=args.num_kv_heads, vocab=args.vocab_size, head_dim=args.head_dim,
                   tied=args.tie_word_embeddings, dtype_bytes=dtype_bytes)

    def shard_bytes(self, lay: Layout) -> float:
        """Weights of the largest pipeline stage on one TP rank (embedding and LM head on their
        stages; both on the one stage when pp == 1 and they are not tied)."""
        ends = self.vocab * self.hidden * (1 if (self.tied or lay.pp > 1) else 2)
        return (math.ceil(self.layers / lay.pp) * self.layer_params + ends) / lay.tp * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "model", dtype_bytes: Optional[int] = None) -> "ModelShape":
        try:
            heads = cfg["num_attention_heads"]
            dt = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            return cls(name=name, layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                       ffn=cfg["intermediate_size"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                       vocab=cfg["vocab_size"], head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                       tied=bool(cfg.get("tie_word_embeddings", False)),
                       dtype_bytes=dtype_bytes or (4 if "32" in str(dt) else 2))
        except KeyError as e:
            raise ConfigError(f"model config {name!r} lacks {e.args[0]!r}: not a Llama-family config") from None


# Paper models (fp16). LLaMA3-15B is our reading of the paper's model: Llama-3-8B's geometry
# with 64 layers (15.0B parameters); the others are the public configs.
MODEL_PRESETS: Dict[str, ModelShape] = {
    "LLaMA3-15B": ModelShape("LLaMA3-15B", 64, 4096, 14336, 32, 8, 128256),
    "LLaMA2-13B": ModelShape("LLaMA2-13B", 40, 5120, 13824, 40, 40, 32000),
    "CodeLLaMA-34B": ModelShape("CodeLLaMA-34B", 48, 8192, 22016, 64, 8, 32016),
    "LLaMA2-70B": ModelShape("LLaMA2-70B", 80, 8192, 28672, 64, 8, 32000),
}


@dataclass(frozen=True)
class Hardware:
    """One device and its links. Rates are effective (what a kernel or a collective gets)."""

    name: str
    flops: float
    """Dense matmul FLOP/s of one device at the serving dtype."""
    mem_bw: float
    """Bytes/s one device reads its weights and KV at."""
    mem_bytes: float
    """Memory of one device (weights + KV + activations)."""
    link_bw: float
    """Bytes/s one device sends to its peers in a collective (PCIe, NVLink, network)."""
    link_latency: float
    """Seconds per collective hop."""
    host_bw: float
    """Bytes/s between one device and host memory (KV swaps, re-sharding)."""
    host_mem_bytes: float = 512 * GiB
    """Host memory of a node; the host KV tier takes host_kv_fraction of it."""
    mfu: float = 0.6
    """Share of `flops` prefill reaches."""
    mem_util: float = 0.9
    """Share of `mem_bytes` the engine may use (vLLM's gpu_memory_utilization)."""
    gpus_per_node: int = 8
    host_kv_fraction: float = 0.5
    transition_overhead_s: float = 0.05
    """Pipeline drain, barriers and bookkeeping per layout switch."""


_PCIE4 = 16 * GiB  # DESIGN.md: A10 over PCIe, 16 GiB/s
_PCIE5 = 32 * GiB
HARDWARE_PRESETS: Dict[str, Hardware] = {
    "A10": Hardware("A10", 125e12, 600e9, 24 * GiB, _PCIE4, 15e-6, _PCIE4),
    "L4": Hardware("L4", 121e12, 300e9, 24 * GiB, _PCIE4, 15e-6, _PCIE4),
    "A100-PCIe": Hardware("A100-PCIe", 312e12, 1935e9, 80 * GiB, _PCIE4, 15e-6, _PCIE4),
    "A100-SXM": Hardware("A100-SXM", 312e12, 2039e9, 80 * GiB, 230e9, 8e-6, _PCIE4),
    "H100-PCIe": Hardware("H100-PCIe", 756e12, 2000e9, 80 * GiB, _PCIE5, 12e-6, _PCIE5),
    "H100-SXM": Hardware("H100-SXM", 989e12, 3350e9, 80 * GiB, 360e9, 6e-6, _PCIE5),
}


@dataclass(frozen=True)
class Workload:
    name: str
    lengths: Tuple[Tuple[int, int], ...]
    """(input, output) tokens of each request."""

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def mean_in(self) -> float:
        return sum(i for i, _ in self.lengths) / self.n

    @property
    def mean_out(self) -> float:
        return sum(o for _, o in self.lengths) / self.n

    def out_quantile(self, q: float) -> float:
        outs = sorted(o for _, o in self.lengths)
        return outs[min(len(outs) - 1, max(0, math.ceil(q * len(outs)) - 1))]

    @classmethod
    def preset(cls, name: str, n: int = 500, scale: float = 1.0, seed: int = 0) -> "Workload":
        from seesaw_mc.workloads import length_pairs

        return cls(f"{name}" + (f" x{scale:g}" if scale != 1 else ""), tuple(length_pairs(name, n, seed, scale)))

    @classmethod
    def from_jsonl(cls, path: str, default_max_tokens: int = 256) -> "Workload":
        """A batch-job input (every format `seesaw-mc generate` reads; invalid lines left out):
        prompt_token_ids count exactly, text about 4 characters per token (no tokenizer here)."""
        from seesaw_mc.inputs import read_requests
        from seesaw_mc.sampling_params import SamplingParams

        specs, _ = read_requests(path, SamplingParams(max_tokens=default_max_tokens), skip_invalid=True)
        pairs = []
        for r in specs:
            text = r.prompt if r.prompt is not None else \
                "".join(str(m.get("content", "")) for m in (r.messages or []) if isinstance(m, dict))
            n_in = len(r.prompt_token_ids) if r.prompt_token_ids is not None else max(1, len(text) // 4)
            pairs.append((n_in, r.params.max_tokens or default_max_tokens))
        if not pairs:
            raise ConfigError(f"workload file {path!r} has no request lines")
        return cls(os.path.basename(path), tuple(pairs))


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


def candidate_layouts(world: int, model: ModelShape) -> List[Layout]:
    """Every dp x tp x pp = world that the engine can run for this model."""
    out = []
    for dp in range(1, world + 1):
        for tp in range(1, world // dp + 1):
            if world % (dp * tp):
                continue
            pp = world // (dp * tp)
            if model.heads % tp or model.kv_heads % tp or pp > model.layers:
                continue
            out.append(Layout(tp=tp, pp=pp, dp=dp))
    return out


class CostModel:
    def __init__(self, model: ModelShape, hw: Hardware, world: int, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, host_kv_bytes: Optional[float] = None):
        self.m, self.hw, self.world = model, hw, world
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
        tokens = n_req * wl.mean_in
        sq = n_req * sum(i * i for i, _ in wl.lengths) / wl.n
        flops = 2 * m.layers * m.layer_params * tokens + 2 * m.layers * m.heads * m.head_dim * sq \
            + 2 * m.vocab * m.hidden * n_req  # the LM head only for each prompt's last token
        compute = flops / (lay.tp * lay.pp * hw.flops * hw.mfu)
        steps = max(1.0, tokens / self.chunk)
        act = tokens * m.hidden * m.dtype_bytes
        ar = self.stage_layers(lay) * 2 * self.allreduce_s(act, lay.tp, calls=steps)
        send = self.p2p_s(act, calls=steps) if lay.pp > 1 else 0.0
        reads = steps * self.weight_bytes(lay) / hw.mem_bw
        # the engine's pipeline fills and drains within each step
        micro = num_microbatches(lay.pp, True, int(min(self.chunk, tokens)))
        return (compute + ar + send + reads) * (micro + lay.pp - 1) / micro

    def decode_batch(self, lay: Layout, wl: Workload, n_req: float) -> int:
        ctx = wl.mean_in + wl.mean_out
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
            cycles = max(1, math.ceil(n_req * (wl.mean_in + wl.mean_out) / est.host_kv_tokens))
            est.transitions = 2 * cycles - 1
            decode = self.decode_s(dec, wl, batch, cycles)
            est.transition_s = cycles * self.transition_s(dec) + (cycles - 1) * self.transition_s(pre)
            # KV crosses each device's host link once each way; it overlaps the compute
            offload = n_req * wl.mean_in * m.kv_bytes_per_token(pre.tp, self.stage_layers(pre)) / hw.host_bw
            swap_in = n_req * wl.mean_in * m.kv_bytes_per_token(dec.tp, self.stage_layers(dec)) / hw.host_bw
            prefill, decode = max(prefill, offload), max(decode, swap_in)
        est.fits = True
        est.prefill_s, est.decode_s = prefill, decode
        est.total_s = prefill + decode + est.transition_s
        est.tokens_per_s = wl.n * (wl.mean_in + wl.mean_out) / est.total_s
        return est


def plan(model: ModelShape, hw: Hardware, world: int, wl: Workload, pairs: bool = True,
         **cost_kw) -> List[Estimate]:
    """Every static layout and every (prefill, decode) pair with the same DP, best first."""
    cm = CostModel(model, hw, world, **cost_kw)
    lays = candidate_layouts(world, model)
    cands = [(a, a) for a in lays]
    if pairs:
        cands += [(a, b) for a in lays for b in lays if a != b and a.dp == b.dp]
    ests = [cm.estimate(a, b, wl) for a, b in cands]
    return sorted(ests, key=lambda e: (not e.fits, -e.tokens_per_s, e.label))


# ---- "this machine", measured on the spot ---------------------------------------------------------
def matmul_flops(threads: int = 1, n: int = 1024, reps: int = 4) -> float:
    """fp32 matmul FLOP/s on `threads` threads: best of 3."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 * reps / best


def measure_machine(threads: int = 1, ranks: int = 1, link_bw: Optional[float] = None,
                    link_latency: Optional[float] = None, mem_bytes: Optional[float] = None) -> Hardware:
    """A CPU rank as a device: matmul FLOP/s and copy bandwidth measured here with `threads`
    threads; the link is loopback gloo (GLOO_LINK) unless given."""
    import torch

    flops = matmul_flops(threads)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.empty(64 * 2 ** 20 // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        bw = 2 * src.numel() * 4 / best  # read + write
    finally:
        torch.set_num_threads(old)
    from seesaw_mc.worker.device_cache import available_host_bytes

    avail = available_host_bytes()
    return Hardware(name=f"this machine ({threads} thread{'s' if threads > 1 else ''}/rank)", flops=flops,
                    mem_bw=bw / max(1, ranks) ** 0.5, mem_bytes=mem_bytes or avail / max(1, ranks),
                    link_bw=link_bw or GLOO_LINK[0],
                    link_latency=link_latency if link_latency is not None else GLOO_LINK[1],
                    host_bw=bw, host_mem_bytes=avail, mfu=1.0, mem_util=0.9, gpus_per_node=max(1, ranks),
                    host_kv_fraction=0.25, transition_overhead_s=0.02)


def resolve_model(spec: str, dtype_bytes: Optional[int] = None) -> ModelShape:
    """A preset name, an HF config.json, or a model folder holding one."""
    for name, shape in MODEL_PRESETS.items():
        if spec.lower() == name.lower():
            return replace(shape, dtype_bytes=dtype_bytes or shape.dtype_bytes)
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ConfigError(f"unknown model {spec!r}: give a config.json, a model folder or one of "
                          f"{', '.join(MODEL_PRESETS)}")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model config {path!r}: {e}") from None
    return ModelShape.from_hf_config(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))),
                                     dtype_bytes=dtype_bytes)


def resolve_hardware(spec: str, world: int, threads: int = 1, **measured_kw) -> Hardware:
    for name, hw in HARDWARE_PRESETS.items():
        if spec.lower() == name.lower():
            return hw
    if spec in ("measured", "this-machine", "cpu"):
        return measure_machine(threads=threads, ranks=world, **measured_kw)
    raise ConfigError(f"unknown hardware {spec!r}: one of {', '.join(HARDWARE_PRESETS)}, measured")


def resolve_workload(spec: str, num_prompts: int = 500, scale: float = 1.0) -> Workload:
    from seesaw_mc.workloads import DATASETS

    if spec in DATASETS and spec != "fixed":
        return Workload.preset(spec, num_prompts, scale)
    if os.path.isfile(spec):
        return Workload.from_jsonl(spec)
    raise ConfigError(f"unknown workload {spec!r}: arxiv-like, sharegpt-like or a JSONL file")


def format_plan(ests: Sequence[Estimate], model: ModelShape, hw: Hardware, world: int, wl: Workload,
                block_size: int = 16, top: int = 10) -> str:
    lines = [f"{model.name} ({model.params / 1e9:.2f}B params, {model.dtype_bytes} B/param) on {world} x {hw.name}; "
             f"workload {wl.name}: {wl.n} requests, mean input {wl.mean_in:.0f}, mean output {wl.mean_out:.0f}",
             f"{'rank':>4}  {'layouts':<14}{'tokens/s':>12}{'prefill s':>11}{'decode s':>10}{'trans.':>7}"
             f"{'trans. s':>9}{'batch':>7}"]
    fit = [e for e in ests if e.fits]
    for i, e in enumerate(fit[:top]):
        lines.append(f"{i + 1:>4}  {e.label:<14}{e.tokens_per_s:>12,.0f}{e.prefill_s:>11.1f}{e.decode_s:>10.1f}"
                     f"{e.transitions:>7}{e.transition_s:>9.2f}{e.decode_batch:>7}")
    for e in (e for e in ests if not e.fits):
        lines.append(f"   -  {e.label:<14}does not fit: {e.why}")
    if fit:
        best = fit[0]
        kv = ", ".join(f"{paper_name(Layout.parse(k))}: {v // block_size:,} blocks of {block_size}"
                       for k, v in best.device_kv_tokens.items())
        lines.append(f"chosen: {best.label}; device KV tier per replica {kv}"
                     + (f"; host KV tier {best.host_kv_tokens // block_size:,} blocks" if best.host_kv_tokens else ""))
    return "\n".join(lines)


def auto_layouts(model_dir: str, world: int, wl: Workload, hw: Hardware, **cost_kw) -> Tuple[Layout, Layout, List[Estimate]]:
    """The best (prefill, decode) layouts for `world` ranks, for `generate --layouts auto`."""
    model = resolve_model(model_dir)
    ests = plan(model, hw, world, wl, **cost_kw)
    if not ests or not ests[0].fits:
        raise ConfigError(f"no layout of {world} ranks fits {model.name}: "
                          + (ests[0].why if ests else "the model's heads/layers allow none"))
    return ests[0].prefill, ests[0].decode, ests
