"""Issue 15 item 7: the CUDA start-up path, run on CPU against a fake CUDA device map.

No GPU is reachable here, so these tests replace the few torch.cuda / torch.distributed
calls the start-up makes and check what the engine asks of them: the device it binds, the
group control traffic goes over, the KV budget it derives, and shards a GPU can copy
asynchronously. The GPU check script (benchmarks/gpu/) runs the real thing."""
import pytest
import torch
import torch.distributed as dist

from seesaw_mc.config import CacheConfig
from seesaw_mc.model.sharding import chunk_row, shard_tensor, unchunk_row
from seesaw_mc.parallel import megatron_adapter as mc
from seesaw_mc.worker import device_cache, node_files

GiB = 1 << 30


@pytest.fixture
def fake_cuda_world(monkeypatch):
    """Rank 1 of 2 on a node with 2 GPUs, whose default group would be NCCL."""
    calls = []
    monkeypatch.setattr(mc, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw["backend"])) or "gloo-side")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr("seesaw_mc.parallel.procs.record_peers", lambda group=None: calls.append(("record_peers", group)))
    monkeypatch.setattr("seesaw_mc.parallel.procs.die_with_parent", lambda: None)
    monkeypatch.setattr(mc, "_CONTROL", None)
    return calls


def test_each_rank_binds_its_local_gpu_before_the_group_starts(fake_cuda_world):
    """Issue 15 item 7: every rank used cuda:0, since nothing called set_device(LOCAL_RANK)."""
    mc.init_distributed()
    assert fake_cuda_world[0] == ("set_device", torch.device("cuda", 1))
    assert ("init", "nccl") in fake_cuda_world
    assert mc.default_device() == torch.device("cuda", 1)


def test_control_traffic_goes_over_a_gloo_side_group_under_nccl(fake_cuda_world, monkeypatch):
    """Issue 15 item 7: CPU tensors and pickled objects were handed to NCCL groups (which take
    CUDA tensors only): the MIN agreement on sizes, the job id, the peers' pids."""
    mc.init_distributed()
    assert ("new_group", "gloo") in fake_cuda_world and mc.control_group() == "gloo-side"
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append(("all_reduce", group)))
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda objs, src=0, group=None: seen.append(("broadcast", group)))
    device_cache.min_over_ranks(7)
    node_files.job_id()
    assert seen == [("all_reduce", "gloo-side"), ("broadcast", "gloo-side")]


def test_cuda_kv_budget_leaves_room_for_the_largest_shard(monkeypatch):
    """Issue 15 item 7: the budget read mem_get_info with megatron's released placeholders
    still cached, and counted only the loaded (prefill) shard, not a larger decode shard."""
    cached = {"bytes": 3 * GiB}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: cached.update(bytes=0))
    total = 80 * GiB

    def mem_get_info(device):
        used = 10 * GiB + cached["bytes"]  # 2 GiB of it the loaded weights
        return total - used, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    cfg = CacheConfig(device_memory_fraction=0.9)
    budget = device_cache.device_kv_budget(cfg, torch.device("cuda", 0), shard_bytes=6 * GiB,
                                           resident_bytes=2 * GiB)
    # Everything but the loaded weights (8 GiB) and the largest shard (6 GiB) stays in use.
    assert budget == int((0.9 * total - 8 * GiB - 6 * GiB) * 0.9)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_shards_of_the_cuda_master_are_contiguous(tp):
    """Issue 15 item 7: a row-parallel shard of [out, in] is a strided column slice, and a GPU
    copies a strided pinned source synchronously. The CUDA master stores such tensors in
    chunks (chunk_row), so every layout's shard is contiguous and the same weight."""
    full = torch.randn(24, 32)
    if tp > 1:
        assert not shard_tensor("decoder.layers.0.mlp.linear_fc2.weight", full, 0, tp, 4).is_contiguous()
    chunked = chunk_row(full, 4)  # lcm of the layouts' TP degrees (here 1, 2 and 4)
    for rank in range(tp):
        plain = shard_tensor("decoder.layers.0.mlp.linear_fc2.weight", full, rank, tp, 4)
        shard = shard_tensor("decoder.layers.0.mlp.linear_fc2.weight", chunked, rank, tp, 4)
        assert shard.is_contiguous()
        assert torch.equal(unchunk_row(shard), plain)
