"""Re-sharding, all of it: both layouts' process groups and model shards, the host master
copy of the weights, taking a layout's shards from it, and the switch between layouts.

The shard rules (seesaw_mc.model.sharding) narrow a full Megatron-named tensor to what a TP
rank owns, as megatron-core's column/row/vocab-parallel layers partition it. Re-sharding to
another layout means running the rules again with the new (tp_rank, tp_size), over the master
copy, which every rank of a node maps once: on CPU a shard is a view and nothing moves.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from seesaw_mc.config import Layout
from seesaw_mc.model import cpu_linear
from seesaw_mc.model.hf_import import iter_megatron_tensors
from seesaw_mc.model.decoder import CausalLM
from seesaw_mc.model.sharding import (chunk_row, fc1_interleave_factor, interleave_fc1, lcm_of, shard_shape,
                                     shard_tensor, tp_rule, unchunk_row)
from seesaw_mc.model_spec import ModelArgs, megatron_tensor_shapes
from seesaw_mc.parallel import megatron_adapter as mc
from seesaw_mc.parallel.procs import fault_point
from seesaw_mc.worker.node_files import create_exclusive, node_shared, require_shm


class MasterWeights:
    """The host master copy: full Megatron-named tensors in one file per node, mapped shared.

    Local rank 0 of each node converts the checkpoint once into a flat file under /dev/shm
    (a gated linear_fc1, weight and bias, stored as interleaved [gate_c; up_c] pairs, see interleave_fc1);
    every rank on the node maps it (MAP_SHARED), so N ranks hold the weights once, not N
    times. Shards are views into the mapping wherever the slice is a strided view of the full
    tensor, which with the interleaved fc1 is every tensor: a re-shard copies no weight bytes
    (unless ffn_hidden_size does not divide evenly, or the vocabulary needs padding). The file
    is unlinked as soon as every local rank has mapped it: nothing is left in /dev/shm, even
    after a crash.
    """

    ALIGN = 64

    def __init__(self, index: dict, buf: torch.Tensor):
        self.index = index
        self._buf = buf
        self.nbytes = buf.numel()
        self.pinned = False

    def pin(self) -> bool:
        """CUDA: page-lock the shared mapping in place (cudaHostRegister), so that shard
        copies to the GPU are asynchronous DMA. Best effort: False leaves it pageable (copies
        are then synchronous, still correct)."""
        if self.pinned or not torch.cuda.is_available():
            return self.pinned
        try:
            err = torch.cuda.cudart().cudaHostRegister(self._buf.data_ptr(), self.nbytes, 0)
            self.pinned = int(err) == 0
        except (AttributeError, RuntimeError, TypeError):
            self.pinned = False
        return self.pinned

    def tensors(self):
        for name, (dtype, shape, off, n) in self.index.items():
            yield name, self._buf[off:off + n].view(getattr(torch, dtype)).view(shape)

    @staticmethod
    def write(path: str, tensors, dtype: torch.dtype) -> dict:
        index, off = {}, 0
        with create_exclusive(path) as f:
            for name, t in tensors:
                t = t.to(dtype).contiguous()
                raw = t.view(torch.uint8).reshape(-1)
                pad = (-off) % MasterWeights.ALIGN
                f.write(b"\0" * pad)
                off += pad
                f.write(raw.numpy().data)
                index[name] = (str(dtype).replace("torch.", ""), list(t.shape), off, raw.numel())
                off += raw.numel()
        return index

    @classmethod
    def open(cls, path: str, index: dict) -> "MasterWeights":
        size = os.path.getsize(path)
        buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        return cls(index, buf)


def local_names(model: CausalLM, name: str) -> List[str]:
    """Megatron global name -> the stage's parameter names (empty if another stage owns it)."""
    if name.startswith("decoder.layers."):
        i = int(name.split(".")[2])
        if not model.layer_start <= i < model.layer_end:
            return []
        return [f"decoder.layers.{i - model.layer_start}." + name.split(".", 3)[3]]
    if name == "embedding.position_embeddings.weight":
        return [name] if model.pre_process else []
    if name == "embedding.word_embeddings.weight":
        out = [name] if model.pre_process else []
        if model.args.tie_word_embeddings and model.post_process and not model.pre_process:
            out.append("output_layer.weight")
        return out
    if name.startswith(("decoder.final_layernorm", "output_layer")):
        return [name] if model.post_process else []
    raise KeyError(name)


def release_weights(model: CausalLM) -> None:
    """Drop a layout's shards (views of the master copy cost nothing; copies are freed), and
    their packed copies."""
    cpu_linear.unpack_model(model)
    empty = torch.empty(0, dtype=model.config.params_dtype, device=model.device)
    for p in model.parameters():
        p.data = empty


def load_shards(model: CausalLM, shapes: Dict[str, tuple], tensors: Iterable[Tuple[str, torch.Tensor]],
                non_blocking: bool = False) -> int:
    """Give the model this rank's shard of every full Megatron-named tensor (views where
    possible); `shapes`: its parameters' shapes. Returns the bytes that had to be copied (shards
    that are not views of the master). non_blocking: on CUDA from a pinned master, copies are
    queued on the current stream."""
    copied = 0
    params = dict(model.named_parameters())
    loaded = set()
    for name, full in tensors:
        for local in local_names(model, name):
            rule = "output_layer.weight" if local == "output_layer.weight" else name
            shard = shard_tensor(rule, full, model.tp_rank, model.tp_size, model.args.num_kv_heads, model.fc1_pairs,
                                 model.args.gated_mlp)
            if shard_shape(shard) != shapes[local]:
                raise ValueError(f"{name}: shard {shard_shape(shard)} != parameter {shapes[local]}")
            data = shard.to(device=model.device, dtype=model.config.params_dtype, non_blocking=non_blocking)
            if data.dim() == 3:  # chunk_row's contiguous chunks, side by side again on the device
                data = unchunk_row(data)
            if data.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
                copied += data.numel() * data.element_size()
            params[local].data = data
            params[local].requires_grad_(False)
            loaded.add(local)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"weights missing for {missing[:3]}")
    return copied


class Resharder:
    """Both layouts of a rank: process groups and model shards per layout (built once at
    start-up: re-creating groups leaks them), the master copy, and the active layout."""

    def __init__(self, config, args: ModelArgs, dtype: torch.dtype, device: torch.device, max_model_len: int,
                 layouts: Dict[str, Layout], job: str, kernels, linear: str = cpu_linear.TORCH):
        self.args, self.dtype, self.device = args, dtype, device
        self.linear = linear  # cpu_linear.ONEDNN: each loaded layout's linears are packed for oneDNN
        distinct = {str(lay): lay for lay in layouts.values()}
        groups = mc.build_layout_groups(distinct, args.num_layers, mc.transformer_config(args, dtype))
        self.groups = {name: groups[str(lay)] for name, lay in layouts.items()}
        self.switching = len(distinct) > 1
        self.fc1_pairs = (fc1_interleave_factor(args.ffn_hidden_size, [lay.tp for lay in distinct.values()])
                          if args.gated_mlp else 1)  # a plain fc1 splits by contiguous rows already
        # CPU shards are views, strided or not; a GPU copies only contiguous pinned shards asynchronously.
        self.row_chunks = lcm_of(lay.tp for lay in distinct.values()) if device.type == "cuda" else 1
        shards = {key: CausalLM(args, dtype, device, max_len=max_model_len, tp_group=g.tp_group,
                                layer_start=g.layer_start, layer_end=g.layer_end, fc1_pairs=self.fc1_pairs,
                                kernels=kernels)
                  for key, g in groups.items()}
        self.models = {name: shards[str(lay)] for name, lay in layouts.items()}
        # megatron allocated placeholder parameters: note their shapes, then drop them.
        self._shapes = {id(m): {n: tuple(p.shape) for n, p in m.named_parameters()} for m in shards.values()}
        for m in shards.values():
            release_weights(m)
        self.master = self._open_master(config.model, job)
        self._weight_stream = None
        if device.type == "cuda":
            self.master.pin()  # page-locked: transitions copy shards asynchronously
            self._weight_stream = torch.cuda.Stream(device)
        self.active = "prefill"
        self._load(self.models["prefill"])
        self.transitions: List[dict] = []

    def _master_form(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """How a tensor is stored in the master so that every layout's shard is one view."""
        if ".linear_fc1." in name:
            return interleave_fc1(full, self.fc1_pairs)
        if tp_rule(name, self.args.gated_mlp) == "row":
            return chunk_row(full, self.row_chunks)
        return full

    def _open_master(self, model_dir: str, job: str) -> "MasterWeights":
        """Local rank 0 converts the checkpoint once per node; every rank maps the result."""
        def create(path):
            shapes = megatron_tensor_shapes(self.args).values()
            need = sum(math.prod(s) * self.dtype.itemsize + MasterWeights.ALIGN for s in shapes)
            require_shm(need, f"the weights ({self.dtype})", "a smaller --dtype")
            tensors = ((n, self._master_form(n, t)) for n, t in iter_megatron_tensors(model_dir, self.args))
            index = MasterWeights.write(path, tensors, self.dtype)
            with create_exclusive(path + ".json", "w") as f:
                json.dump(index, f)

        def open_(path):
            with open(path + ".json") as f:
                return MasterWeights.open(path, json.load(f))

        return node_shared(job, "weights", create, open_)

    def resident_bytes(self) -> int:
        """Bytes of the active layout's weights on the device (0 on CPU: views of the master)."""
        if self.device.type != "cuda":
            return 0
        return sum(p.numel() * p.element_size() for p in self.models[self.active].parameters())

    def _load(self, model: CausalLM, non_blocking: bool = False, lazy: bool = False) -> int:
        """This rank's shards into `model`, and its linears packed (now, or with `lazy` on first
        need: a switch's decode layout at few rows never needs them, see cpu_linear)."""
        copied = load_shards(model, self._shapes[id(model)], self.master.tensors(), non_blocking)
        if self.linear == cpu_linear.ONEDNN:
            copied += cpu_linear.pack_model(model, lazy)
        return copied

    def activate(self, name: str, drain_kv) -> Optional[dict]:
        """Switch to layout `name`: its process groups and its weight shards. KV needs no move:
        between the phases it lives in the host tier; drain_kv() finishes the copies the old
        layout started there, and the barrier orders one layout's writes before the other's
        reads. Collective over the replica. Returns the transition's record, or None when `name`
        shares the active layout's shards."""
        old, self.active = self.active, name
        self.groups[old].wait_sends()  # the old layout's activations are at the next stage
        if self.models[old] is self.models[name]:
            return None
        t0 = time.perf_counter()
        fault_point("transition")
        cuda = self.device.type == "cuda"
        if cuda:  # the last step's kernels are done before their weights' memory is reused
            torch.cuda.current_stream(self.device).synchronize()
        release_weights(self.models[old])
        if cuda:
            # Shards DMA from the pinned master copy on a side stream while the KV offload
            # drains below (opposite directions over PCIe).
            with torch.cuda.stream(self._weight_stream):
                weight_bytes = self._load(self.models[name], non_blocking=self.master.pinned)
        else:  # views of the shared master copy: nothing moves, nothing is packed yet
            weight_bytes = self._load(self.models[name], lazy=True)
        t1 = time.perf_counter()
        drain_kv()
        t2 = time.perf_counter()
        if cuda:
            self._weight_stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self._weight_stream)
        t3 = time.perf_counter()
        dist.barrier(group=self.groups[name].control_mp)
        t4 = time.perf_counter()
        rec = {"from": old, "to": name, "weights_s": (t1 - t0) + (t3 - t2), "kv_drain_s": t2 - t1,
               "barrier_s": t4 - t3, "weight_bytes_copied": weight_bytes, "total_s": t4 - t0, "at": time.time()}
        self.transitions.append(rec)
        return rec
