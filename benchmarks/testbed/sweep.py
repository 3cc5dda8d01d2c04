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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import netns  # noqa: E402
from seesaw_mc import planner  # noqa: E402
from seesaw_mc.config import Layout  # noqa: E402
from seesaw_mc.model_spec import ModelShape  # noqa: E402
from seesaw_mc.workloads import make_workload  # noqa: E402

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


def run_one(tb, model: str, inp: str, layouts: str, port: int, extra) -> dict:
    out = tempfile.mktemp(suffix=".jsonl")
    metrics = tempfile.mktemp(suffix=".json")
    cmd = ["env", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=1", os.path.join(ROOT, "launch", "torchrun_multinode.sh"),
           "--model", model, "--input", inp, "--output", out, "--layouts", layouts, "--allreduce", "gloo",
           "--ignore-eos", "--no-tqdm", "--metrics-json", metrics, *extra]
    res = tb.run(cmd, master_port=port, timeout=1800)
    if any(r.returncode for r in res):
        raise RuntimeError(f"{layouts}: " + " | ".join(r.stderr.strip().splitlines()[-1] for r in res if r.stderr))
    return _parse("\n".join(r.stderr for r in res), out, metrics)


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
    with open(metrics) as f:
        met = json.load(f)
    for p in (out, metrics):
        os.unlink(p)
    return {"requests_per_second": float(m.group(1)), "tokens_per_second": float(m.group(2)),
            "output_tokens_per_second": float(m.group(3)), "transitions": len(met["transitions"]),
            "prefill_time_s": met["engine"]["prefill_time_s"], "decode_time_s": met["engine"]["decode_time_s"]}


def summarize(runs: list) -> dict:
    tps = [r["tokens_per_second"] for r in runs]
    return {"min": min(tps), "median": statistics.median(tps), "max": max(tps), "runs": runs}


def predicted(model_dir: str, reqs, layouts, rate_mbit, machine: planner.Hardware, loopback: bool) -> dict:
    """Planner's tokens/s for each measured layout, on this machine (measured once) with this link."""
    wl = planner.Workload("bench", tuple((len(r.prompt_token_ids), r.output_len) for r in reqs))
    if loopback:
        bw, lat = planner.SHM_LINK
    else:
        bw, lat = ((rate_mbit * 1e6 / 8) if rate_mbit else planner.GLOO_LINK[0]), TESTBED_LATENCY_S
    hw = dataclasses.replace(machine, link_bw=bw, link_latency=lat)
    cm = planner.CostModel(planner.resolve_model(model_dir), hw, 2)
    out = {}
    for lay in layouts:
        pre, dec = Layout.parse_pair(lay)
        out[lay] = cm.estimate(pre, dec, wl).tokens_per_s
    return out


def top3_agreement(measured: dict, pred: dict) -> int:
    top = lambda d: set(sorted(d, key=lambda k: -d[k])[:3])  # noqa: E731
    return len(top(measured) & top(pred))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--link-rate", default="auto", help="comma list of Mbit/s (0: unlimited veth) and/or auto")
    p.add_argument("--layouts", default="tp2,pp2,P2->T2,T2->P2,dp2")
    p.add_argument("--dataset-name", default="sharegpt-like", choices=["arxiv-like", "sharegpt-like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--length-scale", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loopback", action="store_true", help="also run every layout as 2 ranks of this host")
    p.add_argument("--output", default=None, help="write OUTPUT.json, OUTPUT.txt and OUTPUT.png")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- more seesaw-mc generate options")
    a = p.parse_args()
    why = netns.available()
    if why:
        print(f"sweep: {why}", file=sys.stderr)
        return 2
    machine = planner.measure_machine(threads=1, ranks=2)
    flops = machine.flops
    rates = [round(auto_rate_mbit(a.model, flops), 1) if x.strip() == "auto" else float(x)
             for x in a.link_rate.split(",")]
    print(f"matmul {flops / 1e9:.0f} GFLOP/s on 1 thread; rates (Mbit/s, 0 = unlimited): {rates}", flush=True)
    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    reqs = make_workload(a.dataset_name, a.num_prompts, vocab, scale=a.length_scale)
    inp = tempfile.mktemp(suffix=".jsonl")
    with open(inp, "w") as f:
        for r in reqs:
            f.write(json.dumps({"prompt_token_ids": r.prompt_token_ids, "max_tokens": r.output_len}) + "\n")
    extra = a.extra[1:] if a.extra[:1] == ["--"] else a.extra
    layouts = a.layouts.split(",")
    rows = []
    port = 29700 + os.getpid() % 200
    try:
        settings = [(r, False) for r in rates] + ([(None, True)] if a.loopback else [])
        for rate, loop in settings:
            row = {"link_mbit": rate or None, "loopback": loop}
            for rep in range(a.repeats):  # repeats interleaved, so drift hits every layout alike
                if loop:
                    runs = {lay: run_loopback(a.model, inp, lay, extra) for lay in layouts}
                else:
                    with netns.Testbed(2, rate_mbit=rate or None) as tb:
                        runs = {}
                        for lay in layouts:
                            port += 1
                            runs[lay] = run_one(tb, a.model, inp, lay, port, extra)
                for lay, r in runs.items():
                    row.setdefault(lay, []).append(r)
                    where = "loopback" if loop else f"link {rate or 'unlimited'} Mbit/s"
                    print(f"{where} run {rep + 1}  {lay:>8}: {r['tokens_per_second']:8.1f} tok/s  prefill "
                          f"{r['prefill_time_s']:.1f} s decode {r['decode_time_s']:.1f} s "
                          f"({r['transitions']} transitions)", flush=True)
            for lay in layouts:
                row[lay] = summarize(row[lay])
            row["predicted"] = predicted(a.model, reqs, layouts, rate, machine, loop)
            rows.append(row)
    finally:
        os.unlink(inp)
    text = table(rows, layouts, a)
    print(text)
    if a.output:
        with open(a.output + ".json", "w") as f:
            json.dump({"rates": rates, "layouts": layouts, "dataset": a.dataset_name, "length_scale": a.length_scale,
                       "num_prompts": a.num_prompts, "repeats": a.repeats, "matmul_flops_1thread": flops,
                       "model": os.path.basename(os.path.normpath(a.model)), "rows": rows}, f, indent=2)
        with open(a.output + ".txt", "w") as f:
            f.write(text + "\n")
        plot(a.output + ".png", rows, layouts, text.splitlines()[0])
    return 0


def table(rows, layouts, a) -> str:
    statics = [x for x in layouts if "->" not in x]
    seesaw = next((x for x in layouts if "->" in x), None)
    lines = [f"{os.path.basename(os.path.normpath(a.model))}, {a.dataset_name} x{a.length_scale}, {a.num_prompts} "
             f"requests, 2 ranks x 1 thread; total tokens/s, median of {a.repeats} (min-max)",
             f"{'setting':>16} " + " ".join(f"{x:>20}" for x in layouts) +
             f"  {seesaw or ''} / best static (min/med/max)   planner top-3 agree"]
    for row in rows:
        where = "loopback" if row["loopback"] else (f"{row['link_mbit']:g} Mbit/s" if row["link_mbit"] else "veth unlimited")
        cells = " ".join(f"{row[x]['median']:>8.0f} ({row[x]['min']:.0f}-{row[x]['max']:.0f})".rjust(20) for x in layouts)
        ratio = ""
        if seesaw and statics:
            best = max(statics, key=lambda x: row[x]["median"])
            ratio = (f"{row[seesaw]['min'] / row[best]['median']:.2f}/{row[seesaw]['median'] / row[best]['median']:.2f}/"
                     f"{row[seesaw]['max'] / row[best]['median']:.2f}x vs {best}")
        meas = {x: row[x]["median"] for x in layouts}
        pred_best = max(row["predicted"], key=row["predicted"].get)
        lines.append(f"{where:>16} {cells}  {ratio:<34}  {top3_agreement(meas, row['predicted'])}/3 "
                     f"(planner: {pred_best})")
    return "\n".join(lines)


def plot(path: str, rows, layouts, title: str) -> None:
    """Fig. 14-style: throughput of each layout against the link rate (unlimited drawn last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for lay in layouts:
        med = [r[lay]["median"] for r in rows]
        ax.errorbar(xs, med, yerr=[[m - r[lay]["min"] for m, r in zip(med, rows)],
                                   [r[lay]["max"] - m for m, r in zip(med, rows)]],
                    marker="o", capsize=3, label=lay, linewidth=2.5 if "->" in lay else 1.5)
    ax.set_xticks(xs, ["loopback" if r["loopback"] else (f"{r['link_mbit']:g}" if r["link_mbit"] else "veth")
                       for r in rows])
    ax.set_xlabel("link rate between the 2 hosts (Mbit/s)")
    ax.set_ylabel("total tokens/s")
    import textwrap

    ax.set_title(textwrap.fill(title, 95), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
