"""One validated configuration tree for the engine.

Every knob is documented where it is declared; `EngineConfig.__post_init__` is the only
place that validates. No torch import here: the scheduler side reads this too.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

from seesaw_mc.errors import ConfigError

_LAYOUT_RE = re.compile(r"^(?:dp(\d+))?(?:tp(\d+))?(?:pp(\d+))?$")
_PAPER_RE = re.compile(r"^(?:D(\d+))?(?:T(\d+))?(?:P(\d+))?$")


class Choice(enum.StrEnum):
    """An option with a fixed list of values. Members are strings, so a config compares,
    prints and serialises as before, and callers may pass plain strings."""

    @classmethod
    def parse(cls, value, option: str) -> "Choice":
        try:
            return cls(value)
        except (ValueError, TypeError):
            raise ConfigError(f"{option} must be one of {cls.listing()} (got {value!r})") from None

    @classmethod
    def listing(cls) -> str:
        return ", ".join(m.value for m in cls)


class DType(Choice):
    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @classmethod
    def _missing_(cls, value):
        # vLLM's short spellings; not listed, but LLM(dtype="bf16") has always worked.
        return {"fp32": cls.FLOAT32, "bf16": cls.BFLOAT16, "fp16": cls.FLOAT16}.get(value)


class AllReduce(Choice):
    AUTO = "auto"
    GLOO = "gloo"
    DEEPSPEED_SHM = "deepspeed-shm"
    NCCL = "nccl"


class Kernels(Choice):
    AUTO = "auto"
    TORCH = "torch"
    DEEPSPEED = "deepspeed"
    APEX = "apex"


@dataclass(frozen=True)
class Layout:
    """A parallel layout: data x tensor x pipeline parallel degrees."""

    tp: int = 1
    """Tensor-parallel degree: attention heads and MLP columns split across tp ranks."""
    pp: int = 1
    """Pipeline-parallel degree: contiguous layer ranges per stage."""
    dp: int = 1
    """Data-parallel replicas; never changes between the prefill and decode layouts."""

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Parse `tp2`, `pp4`, `tp2pp2`, `dp2tp2pp1`, or the paper's `T4`, `P4`, `D2P4`."""
        s = text.strip()
        m = _LAYOUT_RE.match(s.lower()) if s.islower() or s.isdigit() else _PAPER_RE.match(s)
        if not s or m is None or not any(m.groups()):
            raise ConfigError(f"invalid layout {text!r}: expected e.g. tp2, pp4, tp2pp2, dp2tp2, T4, P4, D2P4")
        dp, tp, pp = (int(g) if g else 1 for g in m.groups())
        if min(dp, tp, pp) < 1:
            raise ConfigError(f"invalid layout {text!r}: degrees must be >= 1")
        return cls(tp=tp, pp=pp, dp=dp)

    @classmethod
    def parse_pair(cls, text: Optional[str]) -> "Tuple[Layout, Layout]":
        """`PREFILL->DECODE` (P4->T4, D2P4->D2T4, pp2->tp2) or one static layout; None: tp1."""
        parts = (text or "tp1").split("->")
        if len(parts) > 2:
            raise ConfigError(f"invalid layouts {text!r}: expected PREFILL->DECODE, e.g. P4->T4")
        return cls.parse(parts[0]), cls.parse(parts[-1])

    def __str__(self) -> str:
        return (f"dp{self.dp}" if self.dp > 1 else "") + f"tp{self.tp}pp{self.pp}"


@dataclass
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    """Tokens per KV block."""
    num_device_blocks: Optional[int] = None
    """Exact number of device KV blocks; overrides the memory budget (like vLLM's num_gpu_blocks_override)."""
    device_memory_bytes: Optional[int] = None
    """KV budget in bytes on the compute device. None: a share of its free memory
    (device_memory_fraction)."""
    device_memory_fraction: float = 0.9
    """CUDA: fraction of total GPU memory the process may use, weights included (vLLM's
    gpu_memory_utilization). CPU: the KV budget is min(1 GiB, fraction x available RAM / 4),
    split among the ranks of the node, because the CPU 'device' shares RAM with everything."""
    device_capacity_bytes: Optional[int] = None
    """Emulate a device of this many bytes per rank (CPU test beds standing in for GPUs): a
    layout whose weight shard does not fit is refused at start-up, as it would run out of GPU
    memory, and the KV budget is device_memory_fraction x capacity - the largest shard. None:
    no such limit (a CPU rank can hold the whole model)."""
    num_host_blocks: Optional[int] = None
    """Exact number of host-tier blocks (whole-model KV, all layers and heads). Only used when
    the prefill and decode layouts differ."""
    host_memory_bytes: Optional[int] = None
    """Host KV tier per node, in bytes. None: host_memory_fraction of available RAM."""
    host_memory_fraction: float = 0.25
    """Share of the node's available RAM for the host tier when host_memory_bytes is unset.
    The tier is a sparse shared-memory file: only blocks in use take memory."""
    enable_prefix_caching: bool = True
    """Share the KV of common prompt prefixes (full blocks) in both tiers: a prefix is stored
    once per tier, a prefill computes only what follows its cached prefix, and requests are
    admitted grouped by shared prefix. Output does not change (core/block_manager.py)."""


@dataclass
class SchedulerConfig:
    """Batching limits of the scheduler."""

    max_num_seqs: int = 256
    """Most sequences in one decode batch."""
    max_num_batched_tokens: int = 4096
    """Prefill token budget per step (the paper's artifact used 4096). A single prompt longer
    than this is still admitted, alone."""
    decode_watermark: float = 0.25
    """Only when prefill and decode layouts differ (SeesawScheduler): go back to prefill once
    the host tier holds nothing left to decode and the decode batch has fallen to this
    fraction of the largest batch of the current decode phase."""
    pipeline_depth: Optional[int] = None
    """Steps in flight under pipeline parallelism. pp: the next step enters stage 0 while later
    stages finish the last ones, and decode runs pp groups of sequences in turn (no stage waits on
    the last). 1: every step waits for its sampled tokens (its micro-batches still pipeline within
    the step). None: pp. On CPU, pp2 (30M Llama, 100 requests, 1 thread per rank, median of 3)
    measured 284 output tokens/s at depth 2 against 220 at depth 1 on random requests, and 70.1
    against 52.4 on arxiv-like ones. Plans and activations travel point to point without waiting
    (ObjectChannel, LayoutGroups.send_forward), so nothing but a step's own inputs holds up a
    stage."""


@dataclass
class EngineConfig:
    """Everything the engine needs; filled from LLM(**kwargs) or the CLI."""

    model: str
    """Folder with config.json, *.safetensors and the tokenizer files."""
    tokenizer: Optional[str] = None
    """Tokenizer folder; defaults to `model`."""
    dtype: DType = DType.AUTO
    """Weights' and activations' dtype. auto: float32 on CPU, the checkpoint's dtype on CUDA."""
    seed: int = 0
    """Engine seed: requests without their own `seed` derive a per-request seed from it."""
    max_model_len: Optional[int] = None
    """Longest prompt + output. None: the model's max_position_embeddings (and sliding window)."""
    collective_timeout_s: float = 600.0
    """Seconds a torch.distributed collective may wait for the other ranks: a dead or hung
    rank fails the job after this."""
    allreduce: AllReduce = AllReduce.AUTO
    """Tensor-parallel all-reduce. auto: NCCL on CUDA; on CPU DeepSpeed's shared-memory
    all-reduce where a TP group spans every rank of the job on one host, else gloo (see
    parallel/deepspeed_ops.py)."""
    tp_overlap: bool = True
    """Prefill steps of a layout with TP > 1 run their micro-batches in pairs, in lockstep, so that
    one's all-reduces cross the link while the other computes (model/lockstep.py;
    test bed, tp2 at 418 Mbit/s: prefill 17.3 -> 12.6 s). Not decode: each half would read every
    weight again (measured 1.6-2x the step on these cores), nor under DeepSpeed's shm all-reduce
    (CPU work, that would only move), nor for models with row-parallel biases.
    --no-tp-overlap: one batch at a time (A/B runs)."""
    kernels: Kernels = Kernels.AUTO
    """Op implementations. RMSNorm, auto: DeepSpeed's inference kernels, then apex, on CUDA;
    on CPU our fused ops (RMSNorm with the residual add, RoPE, silu * up: model/fused_ops.py),
    torch where they did not build (model/kernels.py). Linear layers: on CPU, oneDNN with
    prepacked weights (model/cpu_linear.py). torch: plain torch for all of them. Both choices are
    logged at start-up."""
    prefill_layout: Layout = field(default_factory=Layout)
    """Layout used for prefill: tp2, pp4, tp2pp2, dp2tp2pp1 (or the paper's T4, P4, D2P4)."""
    decode_layout: Layout = field(default_factory=Layout)
    """Layout used for decode; dp must equal prefill_layout.dp."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """KV cache tiers; set through the flat options in ALIASES (block_size=..., num_host_blocks=...)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batching limits; set through the flat options in ALIASES (max_num_seqs=...)."""

    # Flat aliases so that LLM(model, block_size=..., max_num_seqs=...) works like vLLM.
    ALIASES = {
        "block_size": ("cache", "block_size"),
        "num_device_blocks": ("cache", "num_device_blocks"),
        "num_gpu_blocks_override": ("cache", "num_device_blocks"),
        "kv_cache_memory_bytes": ("cache", "device_memory_bytes"),
        "gpu_memory_utilization": ("cache", "device_memory_fraction"),
        "num_host_blocks": ("cache", "num_host_blocks"),
        "device_capacity_bytes": ("cache", "device_capacity_bytes"),
        "host_memory_bytes": ("cache", "host_memory_bytes"),
        "enable_prefix_caching": ("cache", "enable_prefix_caching"),
        "max_num_seqs": ("scheduler", "max_num_seqs"),
        "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
        "decode_watermark": ("scheduler", "decode_watermark"),
        "pipeline_depth": ("scheduler", "pipeline_depth"),
    }

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        top = {k: v for k, v in kwargs.items() if k in names}
        cfg = cls(model=model, **{k: v for k, v in top.items() if k not in ("cache", "scheduler")})
        for k, v in kwargs.items():
            if k in names:
                continue
            if k not in cls.ALIASES:
                raise ConfigError(f"unknown engine option {k!r}")
            section, attr = cls.ALIASES[k]
            setattr(getattr(cfg, section), attr, v)
        cfg.validate()
        return cfg

    def __post_init__(self):
        for name in ("prefill_layout", "decode_layout"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, Layout.parse(v))
        self.validate()

    def validate(self) -> None:
        """Refuse a bad value with one line naming the option; choices become enum members."""
        self.dtype = DType.parse(self.dtype, "dtype")
        self.allreduce = AllReduce.parse(self.allreduce, "allreduce")
        self.kernels = Kernels.parse(self.kernels, "kernels")
        c, s = self.cache, self.scheduler
        if not isinstance(c.block_size, int) or c.block_size < 1:
            raise ConfigError(f"block_size must be a positive integer (got {c.block_size!r})")
        if c.num_device_blocks is not None and (not isinstance(c.num_device_blocks, int) or c.num_device_blocks < 1):
            raise ConfigError(f"num_device_blocks must be a positive integer (got {c.num_device_blocks!r})")
        if c.device_memory_bytes is not None and c.device_memory_bytes <= 0:
            raise ConfigError(f"kv_cache_memory_bytes must be positive (got {c.device_memory_bytes!r})")
        if c.device_capacity_bytes is not None and c.device_capacity_bytes <= 0:
            raise ConfigError(f"device_capacity_bytes must be positive (got {c.device_capacity_bytes!r})")
        if c.num_host_blocks is not None and (not isinstance(c.num_host_blocks, int) or c.num_host_blocks < 1):
            raise ConfigError(f"num_host_blocks must be a positive integer (got {c.num_host_blocks!r})")
        if not isinstance(c.enable_prefix_caching, bool):
            raise ConfigError(f"enable_prefix_caching must be True or False (got {c.enable_prefix_caching!r})")
        if not 0.0 < c.host_memory_fraction <= 1.0:
            raise ConfigError(f"host_memory_fraction must be in (0, 1] (got {c.host_memory_fraction!r})")
        if not 0.0 < c.device_memory_fraction <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1] (got {c.device_memory_fraction!r})")
        if not isinstance(s.max_num_seqs, int) or s.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be a positive integer (got {s.max_num_seqs!r})")
        if not isinstance(s.max_num_batched_tokens, int) or s.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be a positive integer (got {s.max_num_batched_tokens!r})")
        if not 0.0 <= s.decode_watermark <= 1.0:
            raise ConfigError(f"decode_watermark must be in [0, 1] (got {s.decode_watermark!r})")
        if s.pipeline_depth is not None and (not isinstance(s.pipeline_depth, int) or s.pipeline_depth < 1):
            raise ConfigError(f"pipeline_depth must be a positive integer (got {s.pipeline_depth!r})")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ConfigError(f"max_model_len must be an integer >= 2 (got {self.max_model_len!r})")
        if self.prefill_layout.dp != self.decode_layout.dp:
            raise ConfigError(
                f"prefill layout {self.prefill_layout} and decode layout {self.decode_layout} must have the same dp"
            )
        if self.prefill_layout.world_size != self.decode_layout.world_size:
            raise ConfigError(
                f"prefill layout {self.prefill_layout} uses {self.prefill_layout.world_size} ranks but decode layout "
                f"{self.decode_layout} uses {self.decode_layout.world_size}"
            )

    @property
    def world_size(self) -> int:
        return self.prefill_layout.world_size
