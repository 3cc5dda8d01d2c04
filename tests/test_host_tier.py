"""The host KV tier's copies: direct (CPU) and staged through a small buffer (the CUDA path,
run here on CPU) must put exactly the same bytes in the same places."""
import torch

from seesaw_mc.worker.host_tier import HostKVBuffer, Stager, block_runs
from seesaw_mc.worker.device_cache import KVCacheViews


def make(tmp_path, name):
    shape = HostKVBuffer.shape(1, 3, 4, 12, 4, 8)  # dp, layers, kv heads, host blocks, block size, head_dim
    return HostKVBuffer.open(str(tmp_path / name), shape, torch.float32, 0, create=True)


def device_views(layers=2, blocks=10, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return KVCacheViews([(torch.randn(blocks, 4, heads, 8, generator=g), torch.randn(blocks, 4, heads, 8, generator=g))
                         for _ in range(layers)], heads)


def test_block_runs():
    assert block_runs([(3, 7), (1, 5), (2, 6), (9, 0)]) == [(1, 5, 3), (9, 0, 1)]


def test_staged_copies_equal_direct_copies(tmp_path):
    pairs = [(1, 5), (2, 6), (3, 7), (8, 0), (9, 11)]
    src = device_views()
    direct, staged = make(tmp_path, "a"), make(tmp_path, "b")
    # A staging buffer of 3 blocks splits the 3-block run and exercises the piecewise path.
    stager = Stager(torch.device("cpu"), torch.float32, staging_bytes=3 * 4 * 2 * 8 * 4)
    direct.copy_out(src, 1, 2, pairs)
    staged.copy_out(src, 1, 2, pairs, stager=stager)
    assert torch.equal(direct.t, staged.t) and direct.t.abs().sum() > 0
    assert direct.bytes_out == staged.bytes_out
    # Layers 1..2, heads 2..3 of the host tier hold exactly the device blocks, head-major.
    for i, (k, v) in enumerate(src.layers):
        for j, dev in enumerate((k, v)):
            for d, h in pairs:
                assert torch.equal(direct.t[1 + i, j, 2:4, h], dev[d].permute(1, 0, 2))
    back_direct, back_staged = device_views(seed=1), device_views(seed=1)
    direct.copy_in(back_direct, 1, 2, pairs)
    staged.copy_in(back_staged, 1, 2, pairs, stager=stager)
    for (k1, v1), (k2, v2), (k0, v0) in zip(back_direct.layers, back_staged.layers, src.layers):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        for d, _ in pairs:
            assert torch.equal(k1[d], k0[d]) and torch.equal(v1[d], v0[d])
