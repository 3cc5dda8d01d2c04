"""ModelRunner: one rank's model shards (one per layout), its device KV memory, and the
execution of a step: micro-batches through the pipeline stages, logits, sampling."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from seesaw_mc.config import Layout
from seesaw_mc.errors import CapacityError
from seesaw_mc.kv.host_tier import HostKVBuffer, unlink_quietly
from seesaw_mc.kv.paged_cache import DeviceKVBuffer, device_kv_budget, host_kv_budget
from seesaw_mc.model.attention import AttnMetadata, decode_chunks, set_attn_metadata
from seesaw_mc.model.kernels import select_kernels
from seesaw_mc.model.hf_import import iter_megatron_tensors
from seesaw_mc.model.llama import CausalLM
from seesaw_mc.model.sharding import fc1_interleave_factor, interleave_fc1
from seesaw_mc.model_spec import ModelArgs, ModelShape, kv_bytes
from seesaw_mc.parallel import megatron_adapter as mc
from seesaw_mc.parallel.procs import fault_point
from seesaw_mc.reshard import MasterWeights, shm_dir
from seesaw_mc.sampling import Sampler
from seesaw_mc.step_plan import num_microbatches

log = logging.getLogger("seesaw_mc")

def split_microbatches(seqs: list, n: int, by_tokens: bool) -> List[list]:
    """Contiguous micro-batches, balanced by tokens (prefill) or count (decode)."""
    n = max(1, min(n, len(seqs)))
    if n == 1:
        return [seqs]
    weights = [len(s) if by_tokens else 1 for s in seqs]
    total, out, cur, acc = sum(weights), [], [], 0
    for s, w in zip(seqs, weights):
        cur.append(s)
        acc += w
        if len(out) < n - 1 and acc >= total * (len(out) + 1) / n:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


class ModelRunner:
    def __init__(self, config, args: ModelArgs, dtype: torch.dtype, max_model_len: int, layouts: Dict[str, Layout],
                 allreduce: str = "gloo"):
        self.config = config
        self.args = args
        self.dtype = dtype
        self.device = mc.default_device()
        self.block_size = config.cache.block_size
        self.rank = dist.get_rank()
        self.local_rank = mc.local_rank(self.rank)
        p2p_cfg = mc.transformer_config(args, dtype)
        distinct = {str(lay): lay for lay in layouts.values()}
        groups = mc.build_layout_groups(distinct, args.num_layers, p2p_cfg)
        self.groups = {name: groups[str(lay)] for name, lay in layouts.items()}
        self.shm_allreduce = None  # DeepSpeed's op once started (it counts its calls)
        self.allreduce = self._start_allreduce(allreduce)
        self.fc1_pairs = fc1_interleave_factor(args.ffn_hidden_size, [lay.tp for lay in distinct.values()])
        self.kernels = select_kernels(config.kernels, self.device, dtype, args.hidden_size, args.rms_norm_eps,
                                      log_once=self.rank == 0)
        shards = {key: CausalLM(args, dtype, self.device, max_len=max_model_len, tp_group=g.tp_group,
                                layer_start=g.layer_start, layer_end=g.layer_end, fc1_pairs=self.fc1_pairs,
                                kernels=self.kernels)
                  for key, g in groups.items()}
        self.models = {name: shards[str(lay)] for name, lay in layouts.items()}
        first = self.groups["prefill"]
        self.replica_group = first.pgs.mp
        self.leader_rank = first.dp_rank * first.layout.tp * first.layout.pp
        self.is_leader = self.rank == self.leader_rank
        self.replica_size = first.layout.tp * first.layout.pp
        self._job = self._job_id()
        self.master = self._open_master()
        self._weight_stream = None
        if self.device.type == "cuda":
            self.master.pin()  # page-locked: transitions copy shards asynchronously
            self._weight_stream = torch.cuda.Stream(self.device)
        # Weights first: on CUDA the KV budget is what is free once they are loaded.
        self.models["prefill"].load_full_tensors(self.master.tensors())
        self.active = "prefill"
        self.num_blocks, self.kv_buffer = self._allocate_kv(max_model_len)
        self.kv_views = {}
        for name, g in self.groups.items():
            views = self.kv_buffer.views(g.layer_end - g.layer_start, self.num_blocks, self.block_size,
                                         args.num_kv_heads // g.layout.tp, args.head_dim, dtype)
            self.kv_views[name] = views
            for layer, kv in zip(self.models[name].decoder.layers, views.layers):
                layer.self_attention.kv_cache = kv
        self.switching = len(distinct) > 1
        self.num_host_blocks = 0
        self.host_kv = self._open_host_kv() if self.switching else None
        # CUDA: KV crosses PCIe through a pinned staging buffer on a side stream (kv/host_tier.py);
        # on CPU both tiers are RAM and copies go direct.
        self.stager = None
        if self.switching and self.device.type == "cuda":
            from seesaw_mc.kv.host_tier import Stager

            self.stager = Stager(self.device, dtype)
        self._copier = None
        self._pending: list = []  # (kind, future) of background KV copies, oldest first
        self.swap_stats = {k: 0.0 for k in ("offload_s", "offload_wait_s", "prefetch_s", "prefetch_wait_s",
                                            "swap_in_s", "swap_out_s")}
        self.swap_stats.update({f"{k}_blocks": 0 for k in ("offload", "prefetch", "swap_in", "swap_out")})
        self.sampler = Sampler()
        self.transitions: List[dict] = []

    # -- start-up -----------------------------------------------------------------------
    def _job_id(self) -> str:
        obj = [uuid.uuid4().hex[:12] if self.rank == 0 else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(obj, src=0)
        return obj[0]

    def _start_allreduce(self, backend: str) -> str:
        """Set up the TP all-reduce chosen by check_layouts. If DeepSpeed's shm op cannot load
        on some rank, every rank falls back to gloo (one warning line)."""
        if backend != "deepspeed-shm":
            mc.set_tp_allreduce(None, dist.get_world_size())
            return backend
        from seesaw_mc.parallel import deepspeed_ops

        module, why = deepspeed_ops.load_shm_op()
        ok = torch.tensor([1 if module is not None else 0], dtype=torch.long)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # every rank must agree before the op's set-up
        if not ok.item():
            if self.rank == 0:
                log.warning("DeepSpeed's shm all-reduce is unavailable (%s); TP all-reduce uses gloo",
                            why or "it did not load on another rank")
            mc.set_tp_allreduce(None, dist.get_world_size())
            return "gloo"
        world = dist.get_world_size()
        reduce = deepspeed_ops.start_shm_allreduce(module, world, self.rank, dist.barrier)
        mc.set_tp_allreduce(reduce, world)
        self.shm_allreduce = reduce
        return backend

    def _node_barrier(self) -> None:
        if dist.get_world_size() > 1:
            dist.barrier()

    def _node_shared(self, kind: str, create, open_):
        """A file in /dev/shm shared by the ranks of a node: local rank 0 runs create(path),
        then every rank open_(path). It is unlinked as soon as every rank has mapped it, so
        nothing is left behind in /dev/shm, even after a crash."""
        path = os.path.join(shm_dir(), f"seesaw-{self._job}-{kind}-{mc.node_rank()}")
        try:
            if self.local_rank == 0:
                create(path)
            self._node_barrier()
            obj = open_(path)
            self._node_barrier()
        finally:
            if self.local_rank == 0:
                unlink_quietly(path)
                unlink_quietly(path + ".json")
        return obj

    def _open_master(self) -> MasterWeights:
        """Local rank 0 converts the checkpoint once per node; every rank maps the result."""
        def create(path):
            tensors = ((n, interleave_fc1(t, self.fc1_pairs) if n.endswith("linear_fc1.weight") else t)
                       for n, t in iter_megatron_tensors(self.config.model, self.args))
            index = MasterWeights.write(path, tensors, self.dtype)
            with open(path + ".json", "w") as f:
                json.dump(index, f)

        def open_(path):
            with open(path + ".json") as f:
                return MasterWeights.open(path, json.load(f))

        return self._node_shared("weights", create, open_)

    def _allocate_kv(self, max_model_len: int) -> Tuple[int, DeviceKVBuffer]:
        c = self.config.cache
        per_block = {n: kv_bytes(g.layer_end - g.layer_start, self.block_size,
                                 self.args.num_kv_heads // g.layout.tp, self.args.head_dim, self.dtype.itemsize)
                     for n, g in self.groups.items()}
        if c.num_device_blocks is not None:
            n = c.num_device_blocks
        else:
            shape = ModelShape.from_model_args(self.args, self.dtype.itemsize)
            budget = device_kv_budget(c, self.device, max(shape.shard_bytes(g.layout) for g in self.groups.values()))
            most = self.config.scheduler.max_num_seqs * (-(-max_model_len // self.block_size))
            n = min(min(budget // b for b in per_block.values()), most)
            if dist.get_world_size() > 1:
                t = torch.tensor([n], dtype=torch.long)
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
                n = int(t.item())
            if n < 1:
                raise CapacityError(f"KV cache budget of {budget} bytes holds no {self.block_size}-token block "
                                    f"({max(per_block.values())} bytes each); raise kv_cache_memory_bytes")
        return n, DeviceKVBuffer(n * max(per_block.values()), self.device)

    def _host_blocks(self) -> int:
        """Host tier size: exact, or a byte budget per node split among its DP replicas."""
        c = self.config.cache
        lay = self.groups["prefill"].layout
        if c.num_host_blocks is not None:
            return c.num_host_blocks
        per_block = kv_bytes(self.args.num_layers, self.block_size, self.args.num_kv_heads,
                             self.args.head_dim, self.dtype.itemsize)
        local = mc.local_world_size(dist.get_world_size())
        replicas_here = max(1, min(lay.dp, local // (lay.tp * lay.pp)))
        return max(1, host_kv_budget(c) // replicas_here // per_block)

    def _open_host_kv(self) -> HostKVBuffer:
        g = self.groups["prefill"]
        self.num_host_blocks = self._host_blocks()
        shape = HostKVBuffer.shape(g.layout.dp, self.args.num_layers, self.args.num_kv_heads, self.num_host_blocks,
                                   self.block_size, self.args.head_dim)
        return self._node_shared(
            "kv", lambda path: HostKVBuffer.open(path, shape, self.dtype, 0, create=True),
            lambda path: HostKVBuffer.open(path, shape, self.dtype, g.dp_rank, create=False))

    # -- the host tier ----------------------------------------------------------------------
    def _kv_slice(self):
        g = self.groups[self.active]
        views = self.kv_views[self.active]
        return views, g.layer_start, g.tp_rank * views.num_kv_heads

    def swap_out(self, pairs) -> None:
        """Device -> host tier for (device_block, host_block) pairs, in the active layout."""
        if pairs:
            self.drain_copies()
            t = time.perf_counter()
            self._begin_staged()
            self.host_kv.copy_out(*self._kv_slice(), pairs, stager=self.stager)
            self.swap_stats["swap_out_s"] += time.perf_counter() - t
            self.swap_stats["swap_out_blocks"] += len(pairs)

    def swap_in(self, pairs) -> None:
        """Host tier -> device for (device_block, host_block) pairs, in the active layout, now."""
        if pairs:
            self.drain_copies()
            t = time.perf_counter()
            self._begin_staged()
            self.host_kv.copy_in(*self._kv_slice(), pairs, stager=self.stager)
            self.swap_stats["swap_in_s"] += time.perf_counter() - t
            self.swap_stats["swap_in_blocks"] += len(pairs)

    def offload_async(self, pairs) -> None:
        """Prefill's KV -> host tier on a background thread, overlapping the next prefill step.
        NOTE: the scheduler keeps these device blocks allocated for one more step
        (SeesawScheduler.after_prefill), so the next step never writes into them."""
        self._background("offload", self.host_kv.copy_out if pairs else None, pairs)

    def prefetch_async(self, pairs) -> None:
        """Host tier -> device on a background thread while this decode step computes. The
        blocks belong to sequences outside this step's batch; the next step waits for the
        copy (drain_copies) before it computes or copies anything else."""
        self._background("prefetch", self.host_kv.copy_in if pairs else None, pairs)

    def _background(self, kind: str, copy, pairs) -> None:
        if not pairs:
            return
        if self._copier is None:
            from concurrent.futures import ThreadPoolExecutor

            self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-kv-copy")
        views = self._kv_slice()
        self._begin_staged()  # on CUDA the side stream starts after the compute issued so far

        def run():
            t = time.perf_counter()
            copy(*views, pairs, stager=self.stager)
            return time.perf_counter() - t

        self._pending.append((kind, self._copier.submit(run)))
        self.swap_stats[f"{kind}_blocks"] += len(pairs)

    def _begin_staged(self) -> None:
        if self.stager is not None:
            self.stager.begin()

    def drain_copies(self, keep: int = 0) -> None:
        """Wait for background copies, all but the newest `keep`."""
        while len(self._pending) > keep:
            kind, fut = self._pending.pop(0)
            t = time.perf_counter()
            self.swap_stats[f"{kind}_s"] += fut.result()
            self.swap_stats[f"{kind}_wait_s"] += time.perf_counter() - t

    def swap_summary(self, since: Optional[dict] = None) -> dict:
        """Copy times and bytes between the tiers (since an earlier summary) and how much of
        the time compute hid: background copies count as hidden except for the time a step
        waited for them; copies made before a step (swap-outs, the first swap-in of a decode
        phase) are not hidden."""
        self.drain_copies()
        hk = self.host_kv
        st = dict(self.swap_stats, bytes_to_host=hk.bytes_out if hk else 0, bytes_from_host=hk.bytes_in if hk else 0)
        if since:
            st = {k: v - since[k] for k, v in st.items()}
        background = st["offload_s"] + st["prefetch_s"]
        exposed = st["offload_wait_s"] + st["prefetch_wait_s"] + st["swap_in_s"] + st["swap_out_s"]
        total = background + st["swap_in_s"] + st["swap_out_s"]
        st["swap_hidden"] = 1 - exposed / total if total else None
        st["offload_hidden"] = 1 - st["offload_wait_s"] / st["offload_s"] if st["offload_s"] else None
        st["prefetch_hidden"] = 1 - st["prefetch_wait_s"] / st["prefetch_s"] if st["prefetch_s"] else None
        return st

    # -- transitions ------------------------------------------------------------------------
    def activate(self, name: str) -> Optional[dict]:
        """Switch to layout `name`: its process groups and its weight shards. KV needs no move:
        between the phases it lives in the host tier; the barrier orders one layout's writes
        there before the other layout's reads. Collective over the replica. Returns the
        transition's record, or None when `name` shares the active layout's shards."""
        old = self.active
        self.active = name
        if self.models[old] is self.models[name]:
            return None
        t0 = time.perf_counter()
        t_groups = time.perf_counter() - t0  # groups were built at start-up: a pointer swap
        fault_point("transition")
        t1 = time.perf_counter()
        cuda = self.device.type == "cuda"
        if cuda:  # the last step's kernels are done before their weights' memory is reused
            torch.cuda.current_stream(self.device).synchronize()
        self.models[old].release_weights()
        if cuda:
            # Shards DMA from the pinned master copy on a side stream while the KV offload
            # drains below (opposite directions over PCIe).
            with torch.cuda.stream(self._weight_stream):
                weight_bytes = self.models[name].load_full_tensors(self.master.tensors(),
                                                                   non_blocking=self.master.pinned)
        else:  # views of the shared master copy: nothing moves
            weight_bytes = self.models[name].load_full_tensors(self.master.tensors())
        t2 = time.perf_counter()
        self.drain_copies()  # the other layout reads what this one wrote
        t3 = time.perf_counter()
        if cuda:
            self._weight_stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self._weight_stream)
        t4 = time.perf_counter()
        dist.barrier(group=self.replica_group)
        t5 = time.perf_counter()
        rec = {"from": old, "to": name, "groups_s": t_groups, "weights_s": (t2 - t1) + (t4 - t3),
               "kv_drain_s": t3 - t2, "barrier_s": t5 - t4, "weight_bytes_copied": weight_bytes,
               "total_s": t5 - t0, "at": time.time()}
        self.transitions.append(rec)
        return rec

    # -- one step ---------------------------------------------------------------------------
    def _prepare(self, is_prefill: bool, seqs) -> tuple:
        dev, bs = self.device, self.block_size
        if is_prefill:
            ids, pos, slots, cu = [], [], [], [0]
            for s in seqs:
                n, bt = len(s), s.block_table
                ids.extend(s.token_ids)
                pos.extend(range(n))
                slots.extend(bt[p // bs] * bs + p % bs for p in range(n))
                cu.append(cu[-1] + n)
            meta = AttnMetadata(True, torch.tensor(pos, device=dev), torch.tensor(slots, device=dev), cu_seqlens=cu,
                                logits_indices=torch.tensor(cu[1:], device=dev) - 1)
        else:
            # Rows arrive sorted by length (see execute), so similar lengths share a chunk.
            ids = [s.last_token for s in seqs]
            lens = [len(s) for s in seqs]
            slots = [s.block_table[(n - 1) // bs] * bs + (n - 1) % bs for s, n in zip(seqs, lens)]
            meta = AttnMetadata(False, torch.tensor([n - 1 for n in lens], device=dev),
                                torch.tensor(slots, device=dev),
                                decode_chunks=decode_chunks(lens, [s.block_table for s in seqs], bs, dev))
        return torch.tensor(ids, device=dev), meta

    @torch.inference_mode()
    def execute(self, is_prefill: bool, seqs, swap_out=(), swap_in=(), offload=(), prefetch=(),
                wait_copies: bool = False) -> Optional[tuple]:
        """Swap KV as told, run one phase over `seqs` in the active layout while prefetching
        the next step's sequences, offload prefilled KV to the host tier. The leader gets
        (tokens, logprobs); other ranks get None."""
        self.swap_out(swap_out)
        self.swap_in(swap_in)
        # Overlap: a prefill step may run while the previous step's offload copies (unless it
        # reuses their blocks); anything else waits for every copy (the blocks it frees may be
        # reused now, and prefetched sequences join this batch).
        self.drain_copies(keep=1 if is_prefill and not wait_copies else 0)
        self.prefetch_async(prefetch)
        if not seqs:
            return ([], []) if self.is_leader else None
        if is_prefill:
            fault_point("prefill")
        g = self.groups[self.active]
        model = self.models[self.active]
        order = None
        if not is_prefill and len(seqs) > 1:
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            seqs = [seqs[i] for i in order]
        results = []
        # megatron-core's TP collectives allocate on torch.cuda.current_device().
        with mc.cpu_device_shim():
            self._run_microbatches(is_prefill, seqs, g, model, results)
        self.offload_async(offload)
        out = None
        if results:
            toks = [t for r in results for t in r[0]]
            lps = [lp for r in results for lp in r[1]]
            if order is not None:  # back to the caller's order
                toks_o, lps_o = [0] * len(toks), [None] * len(lps)
                for j, i in enumerate(order):
                    toks_o[i], lps_o[i] = toks[j], lps[j]
                toks, lps = toks_o, lps_o
            out = (toks, lps)
        sampler = g.sampler_rank
        if sampler != self.leader_rank:
            if self.rank == sampler:
                dist.send_object_list([out], dst=self.leader_rank)
                return None
            if self.is_leader:
                box = [None]
                dist.recv_object_list(box, src=sampler)
                return box[0]
        return out if self.is_leader else None

    def _run_microbatches(self, is_prefill, seqs, g, model, results) -> None:
        try:
            n = num_microbatches(g.layout.pp, is_prefill, sum(len(s) for s in seqs))
            for mb in split_microbatches(seqs, n, by_tokens=is_prefill):
                input_ids, meta = self._prepare(is_prefill, mb)
                set_attn_metadata(meta)
                hidden = None if g.is_first_stage else g.recv_forward((input_ids.numel(), self.args.hidden_size))
                h = model(input_ids, hidden)
                if not g.is_last_stage:
                    g.send_forward(h)
                    continue
                if meta.logits_indices is not None:
                    h = h.index_select(0, meta.logits_indices)
                logits = model.compute_logits(h)
                if g.tp_rank == 0:
                    results.append(self.sampler(logits, mb))
        finally:
            set_attn_metadata(None)

    def broadcast_plan(self, plan=None):
        """Leader -> every rank of the replica."""
        if self.replica_size == 1:
            return plan
        box = [plan]
        dist.broadcast_object_list(box, src=self.leader_rank, group=self.replica_group)
        return box[0]
