"""The requests of one run, handed out to the DP replicas while they run.

A static split (request i to replica i mod DP) let one replica finish long before another:
it then waited in the final gather until collective_timeout_s ran out, and the job died
(exit 4) while the slower replica was still working. Instead, each replica's leader takes
the next requests when its scheduler runs short, and reports when it is done; the gather
happens only once every replica has reported.

The dispenser is a counter in the job's torch.distributed store (the TCPStore behind
init_process_group: every rank of every node reaches it, no collective and no shared file
system needed). `store.add(key, n)` is an atomic fetch-add, so two leaders never take the
same request, whatever the race. While a leader waits for the others it polls the store
(every POLL_S) instead of blocking in a collective, and checks that every other replica
is still making progress: each leader bumps a heartbeat counter at most once a second,
and a replica whose counter stands still for collective_timeout_s is reported as hung.

How many to take (`take(want)`), guided self-scheduling: never more than the leader's
scheduler can start at its next step (`want`, see driver.py), and never more than this
replica's share of what is left (ceil(left / DP)). Early on a leader takes whole batches,
so the engine batches as it would with the whole queue in hand; near the end the chunks
shrink to single requests, so the replicas finish within about one request of each other.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from seesaw_mc.errors import RankFailure

POLL_S = 0.1
"""Seconds between polls of the store while a finished replica waits for the others: a
store round trip costs about 0.1 ms on loopback, so this is free, and it adds at most
0.1 s to the end of a run."""
BEAT_S = 1.0
"""Least seconds between two heartbeats of a replica (one store round trip each)."""


class WorkQueue:
    """Requests 0..total-1 of run `run`, shared by `dp_size` replica leaders."""

    def __init__(self, store, run: int, total: int, dp_size: int, dp_rank: int, timeout_s: float):
        import torch.distributed as dist

        self.store = dist.PrefixStore(f"seesaw/run{run}/", store)
        self.total, self.dp_size, self.dp_rank, self.timeout_s = total, dp_size, dp_rank, timeout_s
        self.exhausted = total == 0
        self._last_beat = 0.0

    def take(self, want: int) -> range:
        """Indices of the next requests for this replica (at most `want`); an empty range once
        every request has been handed out."""
        if self.exhausted or want <= 0:
            return range(0)
        left = self.total - self.store.add("next", 0)
        n = min(want, -(-left // self.dp_size))
        if n <= 0:
            self.exhausted = True
            return range(0)
        # Another leader may take between the read and the add: fetch-add still gives each
        # request to exactly one leader; only the chunk size was computed on a stale count.
        end = self.store.add("next", n)
        if end >= self.total:
            self.exhausted = True
        return range(min(end - n, self.total), min(end, self.total))

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= BEAT_S:
            self.store.add(f"beat{self.dp_rank}", 1)
            self._last_beat = now

    def finish(self, keepalive: Callable[[], None]) -> None:
        """Report this replica done and return once every replica is; `keepalive()` runs between
        polls (it keeps this replica's other ranks from timing out while they wait)."""
        self.store.add("done", 1)
        seen = {r: (-1, time.monotonic()) for r in range(self.dp_size) if r != self.dp_rank}
        while self.store.add("done", 0) < self.dp_size:
            self.beat()
            keepalive()
            self._check_alive(seen)
            time.sleep(POLL_S)

    def _check_alive(self, seen: dict) -> None:
        """Raise RankFailure if another replica's heartbeat has stood still for timeout_s (a
        replica that is done keeps beating while it waits)."""
        now = time.monotonic()
        for r, (count, since) in seen.items():
            current = self.store.add(f"beat{r}", 0)
            if current != count:
                seen[r] = (current, now)
            elif now - since > self.timeout_s:
                raise RankFailure(f"DP replica {r} made no progress for {self.timeout_s:.0f} s (it hung or its node "
                                  f"is unreachable; collective_timeout_s); this rank stopped. Lines already in the "
                                  f"output are kept: rerun the same command with --resume")


def default_store() -> Optional[object]:
    """The store of the default process group (None without torch.distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()
