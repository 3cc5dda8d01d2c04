"""The host KV tier's copies: direct (CPU) and staged through a small buffer (the CUDA path,
run here on CPU) must put exactly the same bytes in the same places."""
import pytest
import torch

from seesaw_mc.worker.host_tier import SHORT_RUN, HostKVBuffer, Stager, block_runs, split_runs
from seesaw_mc.worker.device_cache import DeviceKVBuffer


def make(tmp_path, name):
    shape = HostKVBuffer.shape(1, 3, 4, 24, 4, 8)  # dp, layers, kv heads, host blocks, block size, head_dim
    return HostKVBuffer.open(str(tmp_path / name), shape, torch.float32, 0, create=True)


def device_views(layers=2, blocks=20, heads=2, seed=0, head_major=False):
    """The engine's device views (DeviceKVBuffer.views), filled with the same numbers in either
    block layout."""
    g = torch.Generator().manual_seed(seed)
    views = DeviceKVBuffer(layers * 2 * blocks * 4 * heads * 8 * 4, torch.device("cpu")).views(
        layers, blocks, 4, heads, 8, torch.float32, head_major=head_major)
    for k, v in views.layers:
        k.copy_(torch.randn(blocks, 4, heads, 8, generator=g))
        v.copy_(torch.randn(blocks, 4, heads, 8, generator=g))
    return views


def test_block_runs():
    assert block_runs([(3, 7), (1, 5), (2, 6), (9, 0)]) == [(1, 5, 3), (9, 0, 1)]


def test_short_runs_are_copied_by_index():
    """Runs of SHORT_RUN blocks or more are copied one by one, the rest together by index."""
    long = [(20 + i, 40 + i) for i in range(SHORT_RUN)]
    runs, dev_ids, host_ids = split_runs([(3, 7), (1, 5), (9, 0)] + long, by_index=True)
    assert runs == [(20, 40, SHORT_RUN)]
    assert dev_ids.tolist() == [1, 3, 9] and host_ids.tolist() == [5, 7, 0]
    assert split_runs([(3, 7)] + long, by_index=True) == (block_runs([(3, 7)] + long), None, None)
    assert split_runs([(3, 7), (9, 0)], by_index=False)[1:] == (None, None)


@pytest.mark.parametrize("head_major", [True, False])
def test_staged_copies_equal_direct_copies(tmp_path, head_major):
    # Short runs (copied by index on CPU) and one long run (copied as a slice).
    pairs = [(1, 5), (2, 6), (3, 7), (8, 0), (9, 11)] + [(10 + i, 14 + i) for i in range(SHORT_RUN + 1)]
    src = device_views(head_major=head_major)
    assert src.layers[0][0].is_contiguous() != head_major
    direct, staged = make(tmp_path, "a"), make(tmp_path, "b")
    # A staging buffer of 3 blocks splits the 7-block run (3 + 3 + 1): the piecewise path.
    stager = Stager(torch.device("cpu"), torch.float32, staging_bytes=3 * 4 * 2 * 8 * 4)
    direct.copy_out(src, 1, 2, pairs)
    staged.copy_out(src, 1, 2, pairs, stager=stager)
    assert torch.equal(direct.t, staged.t) and direct.t.abs().sum() > 0
    per_block = 2 * 4 * 8 * 4  # this rank's 2 heads x 4 tokens x head_dim 8, fp32
    assert direct.bytes_out == staged.bytes_out == len(pairs) * 2 * 2 * per_block  # 2 layers, K|V
    # Layers 1..2, heads 2..3 of the host tier hold exactly the device blocks, head-major.
    for i, (k, v) in enumerate(src.layers):
        for j, dev in enumerate((k, v)):
            for d, h in pairs:
                assert torch.equal(direct.t[1 + i, j, 2:4, h], dev[d].permute(1, 0, 2))
    # Back into the other block layout: the host tier is the same for both.
    back_direct, back_staged = device_views(seed=1, head_major=not head_major), device_views(seed=1)
    direct.copy_in(back_direct, 1, 2, pairs)
    staged.copy_in(back_staged, 1, 2, pairs, stager=stager)
    assert direct.bytes_in == staged.bytes_in == len(pairs) * 2 * 2 * per_block
    untouched = sorted(set(range(20)) - {d for d, _ in pairs})
    for (k1, v1), (k2, v2), (k0, v0), (kb, vb) in zip(back_direct.layers, back_staged.layers, src.layers,
                                                      device_views(seed=1).layers):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        for d, _ in pairs:
            assert torch.equal(k1[d], k0[d]) and torch.equal(v1[d], v0[d])
        assert torch.equal(k1[untouched], kb[untouched]) and torch.equal(v1[untouched], vb[untouched])


def test_released_host_blocks_give_their_pages_back(tmp_path):
    """Issue 15 item 2: the host tier is a sparse file in shared memory, so only blocks in use
    should take memory; blocks free at a decode -> prefill transition are punched out of it
    (madvise MADV_REMOVE), and the blocks around them keep their KV."""
    import os
    import tempfile

    d = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else str(tmp_path)
    path = os.path.join(d, "kv")
    # 2 layers, K|V, 2 heads, 64 blocks of 16 tokens x 64 dims in fp32: 4 KiB per block and head.
    shape = HostKVBuffer.shape(1, 2, 2, 64, 16, 64)
    host = HostKVBuffer.open(path, shape, torch.float32, 0, create=True)
    try:
        host.t.fill_(1.0)
        before = os.stat(path).st_blocks * 512
        released = host.release([(8, 32), (50, 1)], 0, 2, 0, 2)
        after = os.stat(path).st_blocks * 512
        per_block = 16 * 64 * 4 * 2 * 2 * 2  # bytes, every layer, K|V and head
        if released == 0:
            pytest.skip("this file system cannot punch holes")
        assert released == 33 * per_block and before - after == released
        assert torch.all(host.t[:, :, :, 8:40] == 0) and torch.all(host.t[:, :, :, 50] == 0)
        assert torch.all(host.t[:, :, :, :8] == 1) and torch.all(host.t[:, :, :, 40:50] == 1)
        assert torch.all(host.t[:, :, :, 51:] == 1)
    finally:
        os.unlink(path)
        os.rmdir(d) if d != str(tmp_path) else None
