"""Seesaw vs static layouts over link bandwidth (the shape of the paper's Fig. 14), on the
network-namespace test bed: 2 hosts x 1 rank, the link between them rate-limited; plus, with
--loopback, the same layouts as 2 ranks on one host (DeepSpeed shm all-reduce where it applies).

    sudo .venv/bin/python benchmarks/testbed/sweep.py --model .cache/models/random-llama-wide-222m \
        --link-rate auto,100,400,0 --repeats 3 --loopback --output benchmarks/results/testbed_sharegpt

--link-rate auto is the A10-equivalent rate for this model on this machine: the rate at which a
TP all-reduce costs the same share of a layer's compute as it does for the paper's LLaMA3-15B
(fp16) on A10s over PCIe (125 TFLOP/s, 16 GiB/s). That share is (FLOP/s / link bytes/s) x
(all-reduce bytes per FLOP = hidden x dtype bytes / params per layer), so the rate follows from
the matmul rate measured on the spot and the model's shape: a narrow model (more all-reduce bytes
per FLOP) needs a faster link than a wide one to sit in the same regime.
Every run is a real `seesaw-mc generate` job (torchrun multi-node, gloo over the limited link) on
the same synthetic requests; min/median/max over --repeats runs. The planner
(seesaw_mc/planner/) ranks the same layouts for each rate, and the table says how many of its
top 3 are the measured top 3.

vLLM's CPU build runs on the same hosts, requests and cores (`--vllm-layouts`, default tp2,pp2;
needs the peer venv, `make peers`): one vLLM rank per host under its external launcher (env://
rendezvous across the hosts). vLLM's multi-host paths do not run here. Ray is refused on vLLM
0.32's CPU platform (no Ray device key; its Ray executor raises "does not support ray"). Its
multi-node `mp` executor (the engine on host 0, `vllm serve --headless --node-rank 1` on host 1)
hung after the warm-up compile, the engine waiting on its broadcast queue to the remote worker.
The external launcher does not pipeline PP, so vLLM's pp2 here is below what its `mp` executor
reaches on one host. The hosts share /dev/shm, where vLLM's CPU communicator would put its
all-reduce; benchmarks/peers/no_shm makes it take its torch.distributed fallback, so every byte
between its ranks crosses the limited link, as ours do (`--vllm-shm on` to see the difference).
With --loopback vLLM runs its own `mp` executor, its shared-memory all-reduce included.

Our repeats are separate jobs, interleaved. On the test bed vLLM's come from one start-up per setting
(a vLLM launch compiles for minutes on 2 cores), its prefix cache reset before each, and each runs in
its turn among ours (its ranks wait on a file in between); on loopback they run back to back. Every
test-bed run records the bytes the hosts' interfaces sent next to the all-reduce and send volume its layout must move
(`link_bytes`, `expected_bytes`): the check that the collectives crossed the link. Each setting's
regime comes from the cost model's terms: the link's bandwidth and latency terms against one TP2
layer's compute, next to the same ratios for the paper's 15B model on A10s over PCIe.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import netns  # noqa: E402
from seesaw_mc import planner  # noqa: E402
from seesaw_mc.config import Layout  # noqa: E402
from seesaw_mc.model_spec import ModelShape  # noqa: E402
from seesaw_mc.workloads import make_workload  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))
import vllm_backend  # noqa: E402

A10 = planner.HARDWARE_PRESETS["A10"]
PAPER_MODEL = planner.MODEL_PRESETS["LLaMA3-15B"]
TESTBED_LATENCY_S = 2.5e-4  # one gloo hop over the veth pair and bridge (2-rank 4 KB all-reduce ~0.5 ms)


def ar_bytes_per_flop(m: ModelShape) -> float:
    return m.hidden * m.dtype_bytes / m.layer_params


def auto_rate_mbit(model_dir: str, flops: float) -> float:
    """Link rate (Mbit/s) at which this model's TP all-reduce costs the share of compute it costs
    the paper's model on A10s over PCIe."""
    share = A10.flops / A10.link_bw * ar_bytes_per_flop(PAPER_MODEL)
    ours = planner.resolve_model(model_dir)
    return flops * ar_bytes_per_flop(ours) / share * 8 / 1e6


def _sent(tb) -> int:
    return sum(c["tx"] for c in tb.counters())


def run_one(tb, model: str, inp: str, layouts: str, port: int, extra) -> dict:
    out = tempfile.mktemp(suffix=".jsonl")
    metrics = tempfile.mktemp(suffix=".json")
    cmd = ["env", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=1", os.path.join(ROOT, "launch", "torchrun_multinode.sh"),
           "--model", model, "--input", inp, "--output", out, "--layouts", layouts, "--allreduce", "gloo",
           "--ignore-eos", "--no-tqdm", "--metrics-json", metrics, *extra]
    sent = _sent(tb)
    res = tb.run(cmd, master_port=port, timeout=1800)
    if any(r.returncode for r in res):
        raise RuntimeError(f"{layouts}: " + " | ".join(r.stderr.strip().splitlines()[-1] for r in res if r.stderr))
    rec = _parse("\n".join(r.stderr for r in res), out, metrics)
    rec["link_bytes"] = _sent(tb) - sent
    return rec


def _vllm_cfg(model: str, reqs, lay: Layout, executor: str, repeats: int) -> dict:
    return {"model": os.path.abspath(model), "prompt_token_ids": [r.prompt_token_ids for r in reqs],
            "output_lens": [r.output_len for r in reqs], "tp": lay.tp, "pp": lay.pp, "executor": executor,
            "dtype": "float32", "max_num_seqs": 256, "warmup": 2, "repeats": repeats, "prefix_caching": True}


NO_SHM = os.path.join(ROOT, "benchmarks", "peers", "no_shm")


class VllmSession:
    """vLLM at `lay` over the test bed, started once per setting, its repeats run when asked (so that
    each runs among ours, in the same minutes): one vLLM rank per host with its external launcher
    (env:// rendezvous across the hosts), pinned to one core each, like ours. With `network_only`
    its collectives take torch.distributed (benchmarks/peers/no_shm), not shared memory. Between
    repeats its ranks wait on a file, taking no core."""

    def __init__(self, tb, model: str, reqs, lay: Layout, port: int, repeats: int, network_only: bool = True):
        self.tb, self.reqs, self.lay, self.repeats, self.done = tb, reqs, lay, repeats, 0
        self.tmp = tempfile.TemporaryDirectory(prefix="vllm-testbed-")
        d = self.tmp.name
        self.out = os.path.join(d, "out.json")
        with open(os.path.join(d, "req.json"), "w") as f:
            json.dump(dict(_vllm_cfg(model, reqs, lay, "external_launcher", repeats), gate=d), f)
        cpus = sorted(os.sched_getaffinity(0))
        base = vllm_backend.peer_env("external_launcher", tb.n, port)

        def host_env(i):
            env = dict(base, RANK=str(i), LOCAL_RANK="0", WORLD_SIZE=str(tb.n), LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR=tb.addr(0), MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       VLLM_CPU_OMP_THREADS_BIND=str(cpus[i % len(cpus)]), VLLM_HOST_IP=tb.addr(i))
            if network_only:
                env["PYTHONPATH"] = NO_SHM
            return env

        self.logs = [open(os.path.join(d, f"host{i}.log"), "w") for i in range(tb.n)]
        self.procs = tb.start([vllm_backend.peer_python(), vllm_backend.RUNNER, "--requests",
                               os.path.join(d, "req.json"), "--output", self.out], master_port=port,
                              host_env=host_env, logs=self.logs)
        self._wait("ready", timeout=1800)  # start-up and compile, before anything else runs

    def _wait(self, name: str, timeout: float) -> dict:
        path, t0 = os.path.join(self.tmp.name, name), time.time()
        while not os.path.exists(path):
            if any(p.poll() not in (None, 0) for p in self.procs) or time.time() - t0 > timeout:
                why = self._last_lines()
                self.close()
                raise RuntimeError(f"vllm {self.lay}: no {name}: {why}")
            time.sleep(0.1)
        with open(path) as f:
            return json.load(f)

    def _last_lines(self) -> str:
        tails = []
        for i in range(len(self.procs)):
            with open(os.path.join(self.tmp.name, f"host{i}.log")) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
            tails.append(lines[-1] if lines else "(no output)")
        return " | ".join(tails)

    def repeat(self, r: int) -> dict:
        """Run repeat `r` now; its record, with the bytes the hosts sent during it."""
        sent = _sent(self.tb)
        open(os.path.join(self.tmp.name, f"go.{r}"), "w").close()
        got = self._wait(f"done.{r}", timeout=1800)
        rec = _vllm_records(self.reqs, {"token_ids": got["token_ids"], "generate_s": [got["generate_s"]]},
                            _sent(self.tb) - sent)[0]
        self.done += 1
        return rec

    def close(self) -> None:
        """After the last repeat its ranks exit on their own; before it (a failure), they are killed."""
        for p in self.procs:
            try:
                p.wait(timeout=120 if self.done == self.repeats else 0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        self.tmp.cleanup()


def run_vllm_loopback(model: str, reqs, lay: Layout, repeats: int) -> list:
    """vLLM at `lay` as 2 ranks of this host, with its own `mp` executor (its shared-memory all-reduce)."""
    got = vllm_backend.run(reqs, model, lay.tp, lay.pp, "mp", repeats=repeats, prefix_caching=True)
    return _vllm_records(reqs, got, None)


def _vllm_records(reqs, got: dict, link_bytes) -> list:
    """One record per repeat of one vLLM start-up (its prefix cache reset before each). `link_bytes`:
    what the hosts sent over those repeats (loopback: None); every record carries its share."""
    if [len(t) for t in got["token_ids"]] != [r.output_len for r in reqs]:
        raise RuntimeError("vllm returned other lengths than asked (ignore_eos)")
    n_out = sum(r.output_len for r in reqs)
    n_all = n_out + sum(len(r.prompt_token_ids) for r in reqs)
    share = link_bytes / len(got["generate_s"]) if link_bytes is not None else None
    return [{"requests_per_second": len(reqs) / secs, "tokens_per_second": n_all / secs,
             "output_tokens_per_second": n_out / secs, "generate_s": secs, "startup_s": got.get("startup_s"),
             "link_bytes": share, "token_ids": got["token_ids"]} for secs in got["generate_s"]]


def run_loopback(model: str, inp: str, layouts: str, extra) -> dict:
    """The same job as 2 ranks of one host (torch elastic, --allreduce auto)."""
    out = tempfile.mktemp(suffix=".jsonl")
    metrics = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", "seesaw_mc", "generate", "--nproc-per-node", "2", "--model", model, "--input", inp,
           "--output", out, "--layouts", layouts, "--ignore-eos", "--no-tqdm", "--metrics-json", metrics, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise RuntimeError(f"{layouts}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return _parse(r.stderr, out, metrics)


def _parse(stderr: str, out: str, metrics: str) -> dict:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("Throughput:"))
    m = re.search(r"([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", line)
    auto = next((ln for ln in stderr.splitlines() if ln.startswith("layouts auto:")), None)
    with open(metrics) as f:
        met = json.load(f)
    with open(out) as f:
        token_ids = [json.loads(ln)["token_ids"] for ln in f if ln.strip()]
    for p in (out, metrics):
        os.unlink(p)
    return {"requests_per_second": float(m.group(1)), "tokens_per_second": float(m.group(2)),
            "output_tokens_per_second": float(m.group(3)), "transitions": len(met["transitions"]),
            "prefill_time_s": met["engine"]["prefill_time_s"], "decode_time_s": met["engine"]["decode_time_s"],
            "transition_s": sum(t.get("total_s", 0.0) for t in met["transitions"]), "token_ids": token_ids,
            **({"auto": auto.split(":", 1)[1].split(" on ")[0].strip(), "auto_line": auto} if auto else {})}


def summarize(runs: list) -> dict:
    tps = [r["tokens_per_second"] for r in runs]
    return {"min": min(tps), "median": statistics.median(tps), "max": max(tps),
            "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs]}


def expected_bytes(m: ModelShape, pre: Layout, dec: Layout, prompt_tokens: int, output_tokens: int) -> float:
    """Bytes all hosts must send between them for these tokens: per token, the TP all-reduces (the
    embedding's and 2 per layer; a ring all-reduce of N bytes sends 2(t-1)N bytes over t ranks) and
    the activations PP sends to each next stage. Prompt tokens run in `pre`, generated ones in `dec`."""
    def per_token(lay: Layout) -> float:
        act = m.hidden * m.dtype_bytes
        return (2 * m.layers + 1) * act * 2 * (lay.tp - 1) * lay.pp + (lay.pp - 1) * act * lay.tp
    return prompt_tokens * per_token(pre) + output_tokens * per_token(dec)


def line_layouts(line: str, rec: dict):
    """(prefill, decode) of a measured line ("tp2", "P2->T2", "vllm pp2", or "auto" as it chose)."""
    spec = line.split()[-1]
    if spec == "auto":  # the paper's names: "T2", "P2->T2", "D2"
        names = {"D": "dp", "T": "tp", "P": "pp"}
        spec = "->".join("".join(f"{names[k]}{v}" for k, v in re.findall(r"([DTP])(\d+)", x))
                         for x in rec.get("auto", "").split("->"))
    if not spec.strip("->"):
        return None
    try:
        return Layout.parse_pair(spec)
    except Exception:  # noqa: BLE001 - an auto choice this table cannot name
        return None


def regime(m: ModelShape, hw: planner.Hardware, batch: int, chunk: int) -> dict:
    """One TP2 layer's all-reduce terms over its compute: bandwidth and latency, in a decode step of
    `batch` sequences and a prefill step of `chunk` tokens (the cost model's terms)."""
    act = m.hidden * m.dtype_bytes
    lat = 2 * 2 * hw.link_latency  # 2 all-reduces per layer, 2(t-1) hops each
    dec = max(m.layer_params * m.dtype_bytes / 2 / hw.mem_bw, m.layer_params * batch / hw.flops)
    pre = m.layer_params * chunk / (hw.flops * hw.mfu)
    return {"decode_bw": 2 * batch * act / hw.link_bw / dec, "decode_lat": lat / dec,
            "prefill_bw": 2 * chunk * act / hw.link_bw / pre, "prefill_lat": lat / pre}


def regime_label(ours: dict, a10: dict) -> str:
    """Which link term binds the decode all-reduce, and each ratio against the A10 node's."""
    kind = "latency" if ours["decode_lat"] > ours["decode_bw"] else "bandwidth"
    comm = ours["decode_lat"] + ours["decode_bw"]
    if comm < 0.05:
        kind = "compute"
    x = {k: ours[k] / a10[k] for k in ("decode_bw", "decode_lat", "prefill_bw")}
    return (f"{kind}-bound decode (link/compute {comm:.2f}); x A10: bw {x['decode_bw']:.1f}, "
            f"lat {x['decode_lat']:.1f}, prefill bw {x['prefill_bw']:.1f}")


def predicted(model_dir: str, reqs, layouts, rate_mbit, machine: planner.Hardware, loopback: bool) -> dict:
    """Planner's tokens/s for each measured layout, on this machine (measured once) with this link."""
    wl = planner.Workload("bench", tuple((len(r.prompt_token_ids), r.output_len) for r in reqs))
    hw = point_hardware(machine, rate_mbit, loopback)
    cm = planner.CostModel(planner.resolve_model(model_dir), hw, 2, tp_overlap=not loopback)  # loopback: shm
    out = {}
    for lay in layouts:
        pre, dec = Layout.parse_pair(lay)
        out[lay] = cm.estimate(pre, dec, wl).tokens_per_s
    return out


def point_hardware(machine: planner.Hardware, rate_mbit, loopback: bool, link=None) -> planner.Hardware:
    """This machine with the point's link: loopback's shm, or the test bed's rate (or what was measured)."""
    if loopback:
        bw, lat = planner.SHM_LINK
    else:
        bw, lat = ((rate_mbit * 1e6 / 8) if rate_mbit else planner.GLOO_LINK[0]), TESTBED_LATENCY_S
        if link:
            bw, lat = (bw if rate_mbit else link[0]), link[1]
    return dataclasses.replace(machine, link_bw=bw, link_latency=lat)


def top3_agreement(measured: dict, pred: dict) -> int:
    top = lambda d: set(sorted(d, key=lambda k: -d[k])[:3])  # noqa: E731
    return len(top(measured) & top(pred))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--link-rate", default="auto", help="comma list of Mbit/s (0: unlimited veth) and/or auto")
    p.add_argument("--layouts", default="tp2,pp2,P2->T2,auto", help="ours: static layouts, pairs and auto")
    p.add_argument("--vllm-layouts", default="tp2,pp2", help="vLLM's static layouts ('' for none)")
    p.add_argument("--vllm-shm", default="off", choices=["off", "on"],
                   help="test bed: let vLLM take its shared-memory all-reduce between the hosts (on: nothing "
                        "crosses the link, which the byte check shows) or not (off, default)")
    p.add_argument("--dataset-name", default="sharegpt-like", choices=["arxiv-like", "sharegpt-like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--length-scale", type=float, default=0.2)
    p.add_argument("--output-scale", type=float, default=None,
                   help="scale outputs by this instead of --length-scale (longer outputs, so decode matters)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loopback", action="store_true", help="also run every layout as 2 ranks of this host")
    p.add_argument("--output", default=None, help="write OUTPUT.json, OUTPUT.txt and OUTPUT.png")
    p.add_argument("--merge", default=None, help="comma list of earlier OUTPUT.json of the same lines and "
                   "workload: write their settings as one table and figure to --output, running nothing")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- more seesaw-mc generate options (ours)")
    a = p.parse_args(argv)
    a.extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    a.layouts = [x for x in a.layouts.split(",") if x]
    a.lines = a.layouts + [f"vllm {x}" for x in a.vllm_layouts.split(",") if x]
    return a


def workload(a):
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    reqs = make_workload(a.dataset_name, a.num_prompts, cfg["vocab_size"], scale=a.length_scale)
    if a.output_scale is not None:
        limit = cfg.get("max_position_embeddings", 1 << 30)
        for r in reqs:
            r.output_len = max(1, min(round(r.output_len * a.output_scale / a.length_scale),
                                      limit - len(r.prompt_token_ids)))
    return reqs


def run_point(a, reqs, inp: str, rate, loop: bool, port: int, rep: int, tb=None, vllm=None) -> dict:
    """Every line at one setting, once (repeat `rep`). On the test bed `tb`, vLLM's lines are the
    sessions in `vllm` (one start-up per setting, started by vllm_sessions: a vLLM launch compiles
    for minutes on these cores), and take their turn like ours. On loopback vLLM's repeats all run
    at the first repeat, from one start-up. The lines take turns at going first: repeat r starts at
    line r (mod their number), so over as many repeats as lines each runs once in every place of
    the order. (In a sweep that ran ours in one order, auto, always last, was 0.91x of the same
    layouts run second, P2->T2; with vLLM's three repeats run back to back at the first, its tp2
    ran at 102-112 against 79-96 in the sweeps before.)"""
    lines = [x for x in a.lines if not (loop and x.startswith("vllm "))]
    lines = lines[rep % len(lines):] + lines[:rep % len(lines)] if lines else lines
    runs = {}
    for line in lines:
        port += 1
        if line.startswith("vllm "):
            runs[line] = [vllm[line].repeat(rep)]
        elif loop:
            runs[line] = [run_loopback(a.model, inp, line, a.extra)]
        else:
            runs[line] = [run_one(tb, a.model, inp, line, port, a.extra)]
    if loop and rep == 0:
        for line in (x for x in a.lines if x.startswith("vllm ")):
            runs[line] = run_vllm_loopback(a.model, reqs, Layout.parse(line.split()[-1]), a.repeats)
    return {line: runs[line] for line in a.lines if line in runs}


@contextlib.contextmanager
def setting(a, reqs, rate, loop: bool, port: int):
    """One setting's test bed (none on loopback) and vLLM sessions, for all its repeats: (tb, sessions)."""
    if loop:
        yield None, {}
        return
    with netns.Testbed(2, rate_mbit=rate or None) as tb:
        sessions = {}
        try:
            for line in (x for x in a.lines if x.startswith("vllm ")):
                port += 1
                sessions[line] = VllmSession(tb, a.model, reqs, Layout.parse(line.split()[-1]), port, a.repeats,
                                             a.vllm_shm == "off")
            yield tb, sessions
        finally:
            for sess in sessions.values():
                sess.close()


def merge(a) -> int:
    """Earlier sweeps' settings in one table and figure: link rates ascending, unlimited, then loopback."""
    docs, paths = [], a.merge.split(",")
    for path in paths:
        with open(path) as f:
            docs.append(json.load(f))
    first = docs[0]
    same = ("dataset", "num_prompts", "length_scale", "output_scale")
    for path, d in zip(paths[1:], docs[1:]):
        if any(d.get(k) != first.get(k) for k in same):
            raise SystemExit(f"sweep --merge: {path} has another workload than {paths[0]}")
    rows = sorted((r for d in docs for r in d["rows"]),
                  key=lambda r: (r["loopback"], r["link_mbit"] is None, r["link_mbit"] or 0))
    # Lines in order of first appearance; a setting that did not run one shows "-" for it.
    a.lines = list(dict.fromkeys(x for d in docs for x in d["lines"]))
    a.repeats = first["repeats"]
    a.layouts = [x for x in a.lines if not x.startswith("vllm ")]
    a.dataset_name, a.length_scale, a.output_scale = first["dataset"], first["length_scale"], first["output_scale"]
    a.num_prompts, a.model = first["num_prompts"], first["model"]
    a.extra = first.get("extra", [])
    rates = sorted({x for d in docs for x in d["rates"]})
    write_outputs(a, rows, rates, first["matmul_flops_1thread"], None, docs)
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.merge:
        return merge(a)
    why = netns.available()
    if why:
        print(f"sweep: {why}", file=sys.stderr)
        return 2
    machine = planner.measure_machine(threads=1, ranks=2)
    flops = machine.flops
    rates = [round(auto_rate_mbit(a.model, flops), 1) if x.strip() == "auto" else float(x)
             for x in a.link_rate.split(",") if x.strip()]  # "" with --loopback: loopback only
    print(f"matmul {flops / 1e9:.0f} GFLOP/s on 1 thread; rates (Mbit/s, 0 = unlimited): {rates}", flush=True)
    reqs = workload(a)
    inp = tempfile.mktemp(suffix=".jsonl")
    with open(inp, "w") as f:
        for r in reqs:
            f.write(json.dumps({"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.output_len}) + "\n")
    rows, first_tokens = [], {}
    port = 29700 + os.getpid() % 200
    try:
        for rate, loop in [(r, False) for r in rates] + ([(None, True)] if a.loopback else []):
            row = {"link_mbit": rate or None, "loopback": loop}
            with setting(a, reqs, rate, loop, port) as (tb, vllm):
                port += len(a.lines) + 1
                for rep in range(a.repeats):  # repeats interleaved, so drift hits every line alike
                    runs = run_point(a, reqs, inp, rate, loop, port, rep, tb, vllm)
                    port += len(a.lines) + 1
                    for line, recs in runs.items():
                        for r in recs:
                            first_tokens.setdefault(line, r["token_ids"])
                            r["identical"] = sum(x == y for x, y in zip(r["token_ids"], first_tokens[a.lines[0]]))
                            row.setdefault(line, []).append(r)
                            print(progress_line(line, r, rate, loop, rep), flush=True)
            finish_row(a, row, reqs, machine, rate, loop)
            rows.append(row)
    finally:
        os.unlink(inp)
    write_outputs(a, rows, rates, flops, reqs)
    return 0


def progress_line(line: str, r: dict, rate, loop: bool, rep: int) -> str:
    where = "loopback" if loop else f"link {rate or 'unlimited'} Mbit/s"
    phases = (f"prefill {r['prefill_time_s']:.1f} s decode {r['decode_time_s']:.1f} s ({r['transitions']} transitions)"
              if "prefill_time_s" in r else f"generate {r['generate_s']:.1f} s")
    sent = f", {r['link_bytes'] / 1e6:.0f} MB sent" if r.get("link_bytes") is not None else ""
    return (f"{where} run {rep + 1}  {line:>10}: {r['tokens_per_second']:8.1f} tok/s  {phases}{sent}"
            f"{' (auto: ' + r['auto'] + ')' if 'auto' in r else ''}, {r['identical']} identical")


def _link_measured(runs: list):
    """The link the auto runs measured: (bytes/s, s per hop), medians; None without auto runs."""
    got = []
    for r in runs:
        m = re.search(r"link measured ([\d.]+) Mbit/s, ([\d.]+) us per hop", r.get("auto_line", ""))
        if m:
            got.append((float(m.group(1)) * 1e6 / 8, float(m.group(2)) * 1e-6))
    if not got:
        return None
    return statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)


def finish_row(a, row: dict, reqs, machine, rate, loop: bool) -> None:
    m = dataclasses.replace(planner.resolve_model(a.model), dtype_bytes=4)  # both engines run fp32 here
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    n_out = sum(r.output_len for r in reqs)
    link = _link_measured(row.get("auto", []))
    for line in a.lines:
        runs = row[line]
        for r in runs:
            pair = line_layouts(line, r)
            r["expected_bytes"] = expected_bytes(m, *pair, n_in, n_out) if pair and not loop else None
        row[line] = summarize(runs)
    row["link_measured"] = link
    row["predicted"] = predicted(a.model, reqs, [x for x in a.layouts if x != "auto"], rate, machine, loop)
    batch, chunk = min(256, len(reqs)), min(4096, n_in)
    ours = regime(m, point_hardware(machine, rate, loop, link), batch, chunk)
    ref = regime(PAPER_MODEL, A10, batch, chunk)
    row["regime"] = {"ours": ours, "a10": ref, "label": regime_label(ours, ref)}


def write_outputs(a, rows, rates, flops, reqs, merged=None) -> None:
    text = table(rows, a) + "\n\n" + checks(rows, a)
    print(text)
    if not a.output:
        return
    lengths = ({"mean_input": statistics.mean(len(r.prompt_token_ids) for r in reqs),
                "mean_output": statistics.mean(r.output_len for r in reqs)} if reqs else
               {"mean_input": merged[0]["mean_input"], "mean_output": merged[0]["mean_output"]})
    with open(a.output + ".json", "w") as f:
        json.dump({"rates": rates, "lines": a.lines, "dataset": a.dataset_name, "length_scale": a.length_scale,
                   "output_scale": a.output_scale, "num_prompts": a.num_prompts, "repeats": a.repeats,
                   **lengths, "extra": a.extra,
                   "matmul_flops_1thread": flops, "model": os.path.basename(os.path.normpath(a.model)),
                   "rows": rows}, f, indent=2)
    with open(a.output + ".txt", "w") as f:
        f.write(text + "\n")
    plot(a.output + ".png", rows, a.lines, text.splitlines()[0])


def _where(row) -> str:
    return "loopback" if row["loopback"] else (f"{row['link_mbit']:g} Mbit/s" if row["link_mbit"] else "veth unlimited")


def ratio(row, line: str, over: list) -> str:
    """line's min/median/max over the best median among `over`, and which that is."""
    over = [x for x in over if x in row]
    if line not in row or not over:
        return ""
    best = max(over, key=lambda x: row[x]["median"])
    b = row[best]["median"]
    return f"{row[line]['min'] / b:.2f}/{row[line]['median'] / b:.2f}/{row[line]['max'] / b:.2f}x vs {best}"


def table(rows, a) -> str:
    ours_static = [x for x in a.layouts if "->" not in x and x != "auto"]
    vllm = [x for x in a.lines if x.startswith("vllm ")]
    seesaw = next((x for x in a.layouts if "->" in x), None)
    out_note = f", outputs x{a.output_scale}" if a.output_scale is not None else ""
    model = os.path.basename(os.path.normpath(a.model)) + (" " + " ".join(a.extra) if a.extra else "")
    lines = [f"{model}, {a.dataset_name} x{a.length_scale}{out_note}, "
             f"{a.num_prompts} requests, 2 ranks x 1 thread; total tokens/s, median of {a.repeats} (min-max)",
             f"{'setting':>16} " + " ".join(f"{x:>20}" for x in a.lines)]
    for row in rows:
        lines.append(f"{_where(row):>16} " + " ".join(
            (f"{row[x]['median']:>8.0f} ({row[x]['min']:.0f}-{row[x]['max']:.0f})" if x in row else "-").rjust(20)
            for x in a.lines))
    lines += ["", f"{'setting':>16}  {seesaw} / best static, ours (min/med/max)  {seesaw} / best vLLM"
                  f"           auto / best static of either          planner top-3 (ours)"]
    for row in rows:
        meas = {x: row[x]["median"] for x in row["predicted"]}
        pred_best = max(row["predicted"], key=row["predicted"].get) if row["predicted"] else "-"
        lines.append(f"{_where(row):>16}  {ratio(row, seesaw, ours_static):<38} {ratio(row, seesaw, vllm):<32} "
                     f"{ratio(row, 'auto', ours_static + vllm):<38} "
                     f"{top3_agreement(meas, row['predicted']) if row['predicted'] else 0}/3 (planner: {pred_best})")
    return "\n".join(lines)


def checks(rows, a) -> str:
    """Per setting: the regime, and per line the bytes the hosts sent over what the layout must send."""
    lines = ["Checks: link bytes sent / all-reduce + send volume the layout needs (median over runs); regime "
             "of a TP2 layer"]
    for row in rows:
        cells = []
        ran = [x for x in a.lines if x in row]
        for x in ran:
            got = [(r["link_bytes"], r["expected_bytes"]) for r in row[x]["runs"] if r.get("expected_bytes")]
            if got:
                cells.append(f"{x} {statistics.median(b / e for b, e in got):.2f}")
        idents = "/".join(str(min(r["identical"] for r in row[x]["runs"])) for x in ran)
        meas = row.get("link_measured")
        link = f"; auto measured {meas[0] * 8 / 1e6:.0f} Mbit/s, {meas[1] * 1e6:.0f} us/hop" if meas else ""
        lines.append(f"{_where(row):>16}  {row['regime']['label']}{link}")
        lines.append(f"{'':>16}  bytes: {', '.join(cells) or '-'}; identical to {a.lines[0]} ({'/'.join(ran)}): "
                     f"{idents} of {a.num_prompts}")
    return "\n".join(lines)


def plot(path: str, rows, lines, title: str) -> None:
    """Fig. 14-style: throughput of each line against the link rate, vLLM's dashed."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for line in lines:
        have = [(x, r[line]) for x, r in zip(xs, rows) if line in r]
        med = [c["median"] for _, c in have]
        ax.errorbar([x for x, _ in have], med, yerr=[[m - c["min"] for m, (_, c) in zip(med, have)],
                                                     [c["max"] - m for m, (_, c) in zip(med, have)]],
                    marker="s" if line.startswith("vllm") else "o", capsize=3, label=line,
                    linestyle="--" if line.startswith("vllm") else "-",
                    linewidth=2.5 if "->" in line or line == "auto" else 1.5)
    ax.set_xticks(xs, ["loopback" if r["loopback"] else (f"{r['link_mbit']:g}" if r["link_mbit"] else "veth")
                       for r in rows])
    ax.set_xlabel("link rate between the 2 hosts (Mbit/s)")
    ax.set_ylabel("total tokens/s")
    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
