"""ModelRunner: owns the model shard and the device KV cache; turns a scheduled batch into
tensors, runs one phase and returns logits."""
from __future__ import annotations

import logging
from typing import List

import torch

from seesaw_mc.kv.paged_cache import allocate_kv_cache, bytes_per_block, device_kv_budget
from seesaw_mc.model.attention import AttnMetadata, set_attn_metadata
from seesaw_mc.model.hf_import import ModelArgs, iter_megatron_tensors
from seesaw_mc.model.llama import CausalLM
from seesaw_mc.parallel import megatron_adapter as mc
from seesaw_mc.scheduler import Phase, SchedulerOutput

log = logging.getLogger("seesaw_mc")


class ModelRunner:
    def __init__(self, config, args: ModelArgs, dtype: torch.dtype, max_model_len: int):
        self.config = config
        self.args = args
        self.dtype = dtype
        self.device = mc.default_device()
        self.block_size = config.cache.block_size
        mc.initialize_model_parallel()
        self.model = CausalLM(args, dtype, self.device, max_len=max_model_len, tp_group=mc.tp_group())
        self.model.load_full_tensors(iter_megatron_tensors(config.model, args))
        self.model.eval()
        self.num_blocks = self._num_blocks(max_model_len)
        self.kv_cache = allocate_kv_cache(len(self.model.decoder.layers), self.num_blocks, self.block_size,
                                          args.num_kv_heads // self.model.tp_size, args.head_dim, dtype, self.device)
        for layer, kv in zip(self.model.decoder.layers, self.kv_cache):
            layer.self_attention.kv_cache = kv

    def _num_blocks(self, max_model_len: int) -> int:
        c = self.config.cache
        if c.num_device_blocks is not None:
            return c.num_device_blocks
        per_block = bytes_per_block(len(self.model.decoder.layers), self.block_size,
                                    self.args.num_kv_heads // self.model.tp_size, self.args.head_dim, self.dtype)
        budget = device_kv_budget(c, self.device)
        # No use holding more than every allowed sequence at full length.
        most = self.config.scheduler.max_num_seqs * (-(-max_model_len // self.block_size))
        n = min(budget // per_block, most)
        if n < 1:
            from seesaw_mc.errors import CapacityError

            raise CapacityError(f"KV cache budget of {budget} bytes holds no {self.block_size}-token block "
                                f"({per_block} bytes each); raise kv_cache_memory_bytes")
        return int(n)

    def _slots(self, seq, start: int, end: int) -> List[int]:
        bs, bt = self.block_size, seq.block_table
        return [bt[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, out: SchedulerOutput) -> tuple:
        dev = self.device
        if out.phase is Phase.PREFILL:
            ids, pos, slots, cu = [], [], [], [0]
            for s in out.seqs:
                n = len(s)
                ids.extend(s.token_ids)
                pos.extend(range(n))
                slots.extend(self._slots(s, 0, n))
                cu.append(cu[-1] + n)
            meta = AttnMetadata(
                True, torch.tensor(pos, device=dev), torch.tensor(slots, device=dev), cu_seqlens=cu,
                logits_indices=torch.tensor(cu[1:], device=dev) - 1)
        else:
            ids = [s.last_token for s in out.seqs]
            lens = [len(s) for s in out.seqs]
            width = max(len(s.block_table) for s in out.seqs)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in out.seqs]
            meta = AttnMetadata(
                False, torch.tensor([n - 1 for n in lens], device=dev),
                torch.tensor([self._slots(s, n - 1, n)[0] for s, n in zip(out.seqs, lens)], device=dev),
                block_tables=torch.tensor(tables, device=dev), context_lens=torch.tensor(lens, device=dev))
        return torch.tensor(ids, device=dev), meta

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one phase for the scheduled sequences; fp32 logits [num_seqs, vocab]."""
        input_ids, meta = self.prepare(out)
        set_attn_metadata(meta)
        try:
            hidden = self.model(input_ids)
            if meta.logits_indices is not None:
                hidden = hidden.index_select(0, meta.logits_indices)
            return self.model.compute_logits(hidden)
        finally:
            set_attn_metadata(None)
