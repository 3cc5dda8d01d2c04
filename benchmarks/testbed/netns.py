"""A rate-limited multi-host test bed on one machine: Linux network namespaces as hosts.

Seesaw pays off when the link between devices is slow next to their compute (PCIe GPUs);
on one CPU box loopback makes TP's all-reduce nearly free. This puts each "host" in a network
namespace, joins them through a bridge (in a namespace of its own) with veth pairs, rate-limits
every host's link with `tc tbf` (and optional added latency with `netem`), then runs a command
on every host, e.g. torchrun multi-node with c10d rendezvous, and removes everything afterwards,
also on failure or Ctrl-C. Needs root (CAP_NET_ADMIN).

    sudo python benchmarks/testbed/netns.py --hosts 2 --link-rate 100 -- \\
        launch/torchrun_multinode.sh --model DIR --input in.jsonl --output out.jsonl --layouts P2->T2 --allreduce gloo

Each host's command gets MASTER_ADDR (host 0), MASTER_PORT, NNODES, NODE_RANK, NPROC (default 1),
LOCAL_ADDR (its address) and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (its interface): all
launch/torchrun_multinode.sh needs where hostnames do not resolve to the namespaces' addresses. The hosts share /dev/shm (one
kernel), like GPUs in one server share host memory, so SEESAW_SINGLE_HOST=1 is set: the engine
treats the job as one node (one host KV tier, one weight copy) while every byte between ranks
crosses the rate-limited links.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
from typing import Callable, List, Optional


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def available() -> Optional[str]:
    """None if a test bed can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc)"
    name = f"sswp{os.getpid() % 100000}"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "netns", "del", name)
    except (RuntimeError, FileNotFoundError) as e:
        return f"network namespaces unavailable ({e})"
    return None


class Testbed:
    """N hosts (namespaces) on a bridge; host i has address 10.77.S.(i+1) on interface h{i}."""

    def __init__(self, hosts: int, rate_mbit: Optional[float] = None, delay_ms: float = 0.0, tag: Optional[str] = None):
        self.n = hosts
        self.rate = rate_mbit
        self.delay = delay_ms
        self.tag = tag or f"ssw{os.getpid() % 100000}"
        self.subnet = f"10.77.{os.getpid() % 250}"
        self.sw = f"{self.tag}sw"
        self.hosts = [f"{self.tag}h{i}" for i in range(hosts)]
        self.up = False

    def ifname(self, i: int) -> str:
        return f"h{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def __enter__(self) -> "Testbed":
        atexit.register(self.down)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            # Unwind to __exit__ (which removes everything) instead of dying where we stand.
            signal.signal(sig, lambda signum, frame: (_ for _ in ()).throw(SystemExit(128 + signum)))
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _build(self) -> None:
        self.up = True
        sh("ip", "netns", "add", self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            sh("ip", "netns", "add", ns)
            host_if, sw_if = f"{self.tag}a{i}", f"{self.tag}b{i}"
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", sw_if)
            sh("ip", "link", "set", host_if, "netns", ns)
            sh("ip", "link", "set", sw_if, "netns", self.sw)
            sh("ip", "-n", ns, "link", "set", host_if, "name", self.ifname(i))
            sh("ip", "-n", self.sw, "link", "set", sw_if, "master", "br0")
            sh("ip", "-n", self.sw, "link", "set", sw_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", self.ifname(i))
            sh("ip", "-n", ns, "link", "set", self.ifname(i), "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            self._shape(ns, self.ifname(i))

    def _shape(self, ns: str, dev: str) -> None:
        """Egress limit on the host's link (so each direction of every pair is limited)."""
        if self.delay:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem",
               "delay", f"{self.delay}ms")
        if self.rate:
            parent = ["parent", "1:", "handle", "2:"] if self.delay else ["root"]
            burst = max(32, int(self.rate * 1e6 / 8 / 250 / 1024))  # ~4 ms of traffic, in KB
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf", "rate",
               f"{self.rate}mbit", "burst", f"{burst}kb", "latency", "50ms")

    def down(self) -> None:
        if not self.up:
            return
        # A second Ctrl-C or SIGTERM (timeout(1) signals both the process and its group) must
        # not interrupt the clean-up half way.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for ns in self.hosts + [self.sw]:
            # Processes left in a host (a peer's workers after a failed run) would outlive its
            # namespace, holding memory and CPU: they go first.
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)  # takes its veth ends with it
        self.up = False

    def env(self, i: int, master_port: int, nproc: int = 1) -> dict:
        return dict(os.environ, MASTER_ADDR=self.addr(0), MASTER_PORT=str(master_port), NNODES=str(self.n),
                    NODE_RANK=str(i), NPROC=str(nproc), LOCAL_ADDR=self.addr(i), GLOO_SOCKET_IFNAME=self.ifname(i),
                    NCCL_SOCKET_IFNAME=self.ifname(i), SEESAW_SINGLE_HOST="1",
                    RDZV_ID=f"{self.tag}-{master_port}")

    def counters(self) -> List[dict]:
        """Bytes each host's interface has sent and received so far ({"tx": n, "rx": n} per host):
        what crossed the rate-limited links, whatever protocol carried it."""
        out = []
        for i, ns in enumerate(self.hosts):
            stats = json.loads(sh("ip", "-n", ns, "-j", "-s", "link", "show", "dev", self.ifname(i)).stdout)[0]
            s64 = stats.get("stats64", stats.get("stats"))
            out.append({"tx": int(s64["tx"]["bytes"]), "rx": int(s64["rx"]["bytes"])})
        return out

    def start(self, cmd: List[str], master_port: int = 29555, nproc: int = 1,
              host_env: Optional[Callable[[int], dict]] = None, logs: Optional[List] = None) -> List[subprocess.Popen]:
        """Start `cmd` on every host at once; `host_env` as in run(). Output goes to `logs` (an open
        file per host, stdout and stderr together), else to pipes."""
        def env(i):
            e = self.env(i, master_port, nproc)
            e.update(host_env(i) if host_env else {})
            return e

        return [subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=env(i), text=True,
                                 **({"stdout": logs[i], "stderr": subprocess.STDOUT} if logs else
                                    {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}))
                for i, ns in enumerate(self.hosts)]

    def run(self, cmd: List[str], master_port: int = 29555, nproc: int = 1, timeout: float = 1800,
            host_env: Optional[Callable[[int], dict]] = None) -> List[subprocess.CompletedProcess]:
        """Run `cmd` on every host at once; returns each host's completed process. `host_env(i)`
        adds or overrides variables for host i."""
        procs = self.start(cmd, master_port, nproc, host_env)
        out = []
        try:
            for p in procs:
                o, e = p.communicate(timeout=timeout)
                out.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--nproc", type=int, default=1, help="ranks per host")
    p.add_argument("--link-rate", type=float, default=None, help="Mbit/s per host link (default: unlimited)")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--master-port", type=int, default=29555)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run on every host")
    a = p.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to run on every host after --")
    why = available()
    if why:
        print(f"testbed: {why}", file=sys.stderr)
        return 2
    with Testbed(a.hosts, a.link_rate, a.delay_ms) as tb:
        results = tb.run(cmd, a.master_port, a.nproc)
    for i, r in enumerate(results):
        sys.stdout.write(r.stdout)
        for line in r.stderr.splitlines():
            print(f"[host {i}] {line}", file=sys.stderr)
    return max(r.returncode for r in results)


if __name__ == "__main__":
    sys.exit(main())
