"""The only module that knows megatron-core internals and its CUDA assumptions.

Everything else asks this module for: a TransformerConfig suited to the device, the rotary
table, RoPE application, process groups, and the distributed start-up. On CPU the
adaptations (cpu initialisation, no fusions, no `torch.cuda.current_device()` calls) are
applied here and only here.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

# megatron-core warns about optional extras (TE, apex, nvidia-modelopt) at import time.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.tensor_parallel import mappings as tp_mappings

HAS_CUDA = torch.cuda.is_available()


def single_host() -> bool:
    """SEESAW_SINGLE_HOST=1: the "nodes" share one kernel and /dev/shm (the network-namespace
    test bed, benchmarks/testbed): treat the job as one node."""
    return os.environ.get("SEESAW_SINGLE_HOST") == "1"


def local_world_size(default: int) -> int:
    """Ranks on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    if single_host():
        return int(os.environ.get("WORLD_SIZE", default))
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or default)


def local_rank(default: int = 0) -> int:
    if single_host():
        return int(os.environ.get("RANK", default))
    return int(os.environ.get("LOCAL_RANK", default))


def node_rank() -> int:
    """This node's index: torchrun sets GROUP_RANK, the deepspeed launcher CROSS_RANK."""
    if single_host():
        return 0
    return int(os.environ.get("GROUP_RANK") or os.environ.get("CROSS_RANK") or 0)


def default_device() -> torch.device:
    if HAS_CUDA:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


# ModelArgs.activation -> the activation_func megatron-core's MLP calls (model_switches.py).
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


def transformer_config(args, params_dtype: torch.dtype, tp_size: int = 1, pp_size: int = 1) -> TransformerConfig:
    """A megatron-core TransformerConfig for a ModelArgs (inference only): the structural
    switches come from model_switches' table, the rest suits the device."""
    from seesaw_mc.model_switches import mcore_switches

    on_cpu = not HAS_CUDA
    switches, _ = mcore_switches(args)
    switches["activation_func"] = ACTIVATIONS[switches["activation_func"]]
    return TransformerConfig(
        **switches,
        rotary_interleaved=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        # Inference: weights come from a checkpoint, never from Megatron's initialisers.
        perform_initialization=False,
        use_cpu_initialization=on_cpu,
        # Fusions need CUDA kernels (TE/apex/triton); on CPU they are turned off.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_dropout_fusion=False,
        # Inference pipelines send activations of varying token counts; the receiver knows
        # each shape from the step plan, so no shape exchange is needed.
        variable_seq_lengths=False,
        batch_p2p_comm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def rotary_table(args, max_len: int, device: torch.device) -> torch.Tensor:
    """RoPE angles for positions [0, max_len): shape [max_len, 1, 1, head_dim] (megatron layout)."""
    rope = RotaryEmbedding(kv_channels=args.head_dim, rotary_percent=1.0, rotary_interleaved=False,
                           rotary_base=args.rope_theta, use_cpu_initialization=True)
    # NOTE: RotaryEmbedding.get_emb/forward move inv_freq to torch.cuda.current_device();
    # building the table from the non-repeated frequencies avoids that on CPU.
    freqs = rope.get_freqs_non_repeated(max_len)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    return emb.to(device)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate t [tokens, 1, heads, head_dim] by per-token angles freqs [tokens, 1, 1, head_dim]."""
    # apply_rotary_pos_emb() asks megatron's parallel_state for a context-parallel group even when
    # none is used; the bshd kernel it dispatches to is called directly.
    return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=False)


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> None:
    """Start torch.distributed from the launcher's environment, or as a 1-rank group."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    from seesaw_mc.parallel.procs import die_with_parent

    die_with_parent()
    backend = backend or ("nccl" if HAS_CUDA else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if HAS_CUDA:
        # Before anything allocates: megatron-core allocates on torch.cuda.current_device(),
        # which is cuda:0 on every rank until this is set.
        torch.cuda.set_device(default_device())
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    global _CONTROL
    _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    from seesaw_mc.parallel.procs import record_peers

    record_peers(_CONTROL)


_CONTROL = None


def control_group():
    """The group for control traffic over the whole job: pickled objects and small CPU tensors
    (plans, sizes agreed by MIN, peers). NCCL takes only CUDA tensors, so under NCCL this is a
    gloo side group, as megatron-core keeps gloo twins of its groups; None (the default
    group) when that is gloo already."""
    return _CONTROL


def set_tp_allreduce(world_reduce, world_size: int) -> None:
    """Route megatron-core's tensor-parallel all-reduce (row-parallel outputs, the vocab-
    parallel embedding) through `world_reduce(tensor) -> bool` when the TP group is the whole
    job, e.g. DeepSpeed's shm all-reduce; other groups, and tensors it declines, use the
    group's own backend. Inside `deferred_tp_reduce()` every one starts asynchronously instead."""
    import torch.distributed as dist

    def _reduce(input_, group):
        if group.size() == 1:
            return input_
        x = input_.contiguous()
        if _DEFERRED is not None:
            _DEFERRED.append(dist.all_reduce(x, group=group, async_op=True))
            return x
        if world_reduce is not None and group.size() == world_size and world_reduce(x):
            return x
        dist.all_reduce(x, group=group)
        return x

    _reduce.seesaw = True
    tp_mappings._reduce = _reduce


_DEFERRED: Optional[list] = None


@contextlib.contextmanager
def deferred_tp_reduce():
    """Within the block megatron-core's TP all-reduces start without waiting, in place on the
    layer's output: the block yields the list of their works, and an output is the sum only
    after its work's wait(). For layers that add nothing after the reduce (no row-parallel
    bias). Lets one micro-batch's all-reduce cross the link while another computes."""
    global _DEFERRED
    if not getattr(tp_mappings._reduce, "seesaw", False):
        set_tp_allreduce(None, 0)
    saved, _DEFERRED = _DEFERRED, []
    try:
        yield _DEFERRED
    finally:
        _DEFERRED = saved


@contextlib.contextmanager
def cpu_device_shim():
    """megatron-core allocates communication buffers on torch.cuda.current_device() and
    dist_checkpointing calls torch.cuda.synchronize(); on a CPU-only host both fail, so for
    the duration of the block they answer "cpu" and do nothing."""
    if HAS_CUDA:
        yield
        return
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None  # dist_checkpointing's save path calls it
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved


def stage_layer_range(num_layers: int, pp: int, stage: int) -> Tuple[int, int]:
    """Contiguous layers of a pipeline stage; the first num_layers % pp stages get one more."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


MAX_PENDING_SENDS = 16
"""Sends a rank keeps unwaited per channel. Receivers take messages in order and lag their
sender by at most the steps in flight, so a wait on the oldest beyond this returns at once (or
after a short back-pressure) and releases its tensor. Completion cannot be polled instead: gloo's
Work.is_completed() stays False until wait() is called."""


def release_sends(sends: list, keep: int = MAX_PENDING_SENDS) -> None:
    """Wait on the oldest of `sends` ((work, tensor) pairs, oldest first) until `keep` remain."""
    excess = len(sends) - keep
    if excess > 0:
        for work, _ in sends[:excess]:
            work.wait()
        del sends[:excess]


@dataclass
class LayoutGroups:
    """One layout's megatron-core process groups and this rank's place in it."""

    name: str
    layout: object
    pgs: ProcessGroupCollection
    tp_rank: int
    pp_rank: int
    dp_rank: int
    layer_start: int
    layer_end: int
    comm: Optional[P2PCommunicator] = None
    control_mp: object = None
    """This replica's ranks (tp x pp) for control traffic: gloo under NCCL (see control_group)."""
    control_dp: object = None
    """The DP group for control traffic (gathering results across replicas)."""

    @property
    def tp_group(self):
        return self.pgs.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def sampler_rank(self) -> int:
        """Global rank that samples: tp rank 0 of the last stage of this DP replica."""
        return self.layout.tp * (self.layout.pp - 1 + self.layout.pp * self.dp_rank)

    _sends: list = field(default_factory=list, init=False, repr=False, compare=False)
    """Forward sends not yet waited on: (megatron-core's request, the tensor it sends), oldest first."""

    def send_forward(self, hidden: torch.Tensor) -> None:
        """Asynchronous: the stage goes on with its next micro-batch (or the next step) while
        the activations travel; megatron-core's overlap_p2p_comm path hands back the requests."""
        with cpu_device_shim():
            _, reqs = self.comm.send_forward_recv_forward(hidden, recv_prev=False, tensor_shape=None,
                                                          overlap_p2p_comm=True)
        reqs = list(reqs.values()) if isinstance(reqs, dict) else list(reqs or [])
        self._sends += [(r, hidden) for r in reqs]
        release_sends(self._sends)

    def wait_sends(self) -> None:
        """Every forward send of this layout delivered (before a layout switch or exit)."""
        release_sends(self._sends, keep=0)

    def recv_forward(self, shape) -> Callable[[], torch.Tensor]:
        """Asynchronous: posts the receive of the previous stage's activations and returns a
        wait() that gives them. Posted a micro-batch ahead, the transfer overlaps this stage's
        compute: gloo moves the bytes only once the receive is posted, and a blocking receive
        cost a stage the whole transfer each micro-batch (0.08 s of 1 s at 418 Mbit/s, measured)."""
        with cpu_device_shim():
            hidden, reqs = self.comm.send_forward_recv_forward(None, recv_prev=True, tensor_shape=tuple(shape),
                                                               overlap_p2p_comm=True)
        reqs = list(reqs.values()) if isinstance(reqs, dict) else list(reqs or [])

        def wait() -> torch.Tensor:
            for r in reqs:
                r.wait()
            return hidden

        return wait


def build_layout_groups(layouts: Dict[str, object], num_layers: int, config_for_p2p) -> Dict[str, LayoutGroups]:
    """Process groups for every layout, built once at start-up on every rank (same order
    everywhere: new_group is collective). Ranks are numbered tp fastest, then pp, then dp,
    so a DP replica is the same set of ranks in every layout."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out: Dict[str, LayoutGroups] = {}
    for name, lay in layouts.items():
        grid = HyperCommGrid([lay.tp, lay.pp, lay.dp], ["tp", "pp", "dp"])
        pgs = ProcessGroupCollection()
        pgs.tp = grid.create_pg("tp")
        pgs.pp = grid.create_pg("pp")
        pgs.mp = grid.create_pg(["tp", "pp"])
        pgs.dp = grid.create_pg("dp")
        tp_rank, rest = rank % lay.tp, rank // lay.tp
        pp_rank, dp_rank = rest % lay.pp, rest // lay.pp
        start, end = stage_layer_range(num_layers, lay.pp, pp_rank)
        g = LayoutGroups(name, lay, pgs, tp_rank, pp_rank, dp_rank, start, end, control_mp=pgs.mp,
                         control_dp=pgs.dp)
        if control_group() is not None:
            twins = HyperCommGrid([lay.tp, lay.pp, lay.dp], ["tp", "pp", "dp"], backend="gloo")
            g.control_mp, g.control_dp = twins.create_pg(["tp", "pp"]), twins.create_pg("dp")
        if lay.pp > 1:
            with cpu_device_shim():
                g.comm = P2PCommunicator(pp_group=pgs.pp, config=config_for_p2p)
        out[name] = g
    return out


# -- megatron-core's own GPTModel, for checkpoint conversion (not used by the engine) ----------
def init_megatron_parallel(tp: int, pp: int, seed: int = 1234) -> None:
    """megatron-core's global parallel state over the current world (tp fastest, then pp)."""
    from megatron.core import parallel_state, tensor_parallel

    with cpu_device_shim():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)


def megatron_gpt_model(args, params_dtype: torch.dtype = torch.float32, vocab_size: Optional[int] = None,
                       init_std: float = 0.02):
    """A megatron-core GPTModel (local layer spec) for a ModelArgs of any family, on this rank's
    pipeline stage of the global parallel state (init_megatron_parallel). Its state dict uses
    Megatron's names; its sharded_state_dict reshards through dist_checkpointing."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cfg = transformer_config(args, params_dtype, tp_size=tp, pp_size=pp)
    cfg.perform_initialization = True
    cfg.init_method_std = init_std
    from megatron.core.utils import init_method_normal, scaled_init_method_normal

    cfg.init_method = init_method_normal(init_std)
    cfg.output_layer_init_method = scaled_init_method_normal(init_std, args.num_layers)
    from seesaw_mc.model_switches import mcore_switches

    _, gpt = mcore_switches(args)
    gpt["rotary_base"] = int(gpt["rotary_base"])
    if vocab_size:
        gpt["vocab_size"] = vocab_size
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_norm)
    with cpu_device_shim():
        model = GPTModel(cfg, spec, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage(), **gpt)
    return model.eval()


@torch.no_grad()
def megatron_gpt_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits [b, s, vocab / tp] of a single-stage GPTModel (causal mask given
    explicitly: megatron-core's default mask is allocated on CUDA)."""
    s = input_ids.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    pos = torch.arange(s)[None].expand_as(input_ids)
    with cpu_device_shim():
        return model(input_ids, pos, attention_mask=mask)
