"""Seesaw vs static layouts over link bandwidth (the shape of the paper's Fig. 14), on the
network-namespace test bed: 2 hosts x 1 rank, the link between them rate-limited.

    sudo .venv/bin/python benchmarks/testbed/sweep.py --model .cache/models/random-llama-57m \
        --link-rate 20,100,1000 --output benchmarks/results/link_sweep

--link-rate auto picks the rate with the FLOP-per-byte-of-link ratio of an A10 over PCIe
(125 TFLOP/s / 16 GiB/s, about 7,800 FLOP per byte), from the matmul rate measured on the spot.
Every run is a real `seesaw-mc generate` job (torchrun multi-node, gloo over the limited link,
--allreduce gloo so TP's all-reduce crosses it) on the same synthetic requests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import netns  # noqa: E402
from workloads import make_workload  # noqa: E402

A10_FLOP_PER_BYTE = 125e12 / (16 * 2**30)


def matmul_flops(threads: int = 1, n: int = 1024, reps: int = 8) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def auto_rate_mbit() -> float:
    """Link rate (Mbit/s) that gives one core's matmul rate the FLOP per link byte of an A10 on PCIe."""
    return matmul_flops() / A10_FLOP_PER_BYTE * 8 / 1e6


def run_one(tb, model: str, inp: str, layouts: str, port: int, extra) -> dict:
    out = tempfile.mktemp(suffix=".jsonl")
    metrics = tempfile.mktemp(suffix=".json")
    cmd = ["env", f"PYTHON={sys.executable}", "OMP_NUM_THREADS=1", os.path.join(ROOT, "launch", "torchrun_multinode.sh"),
           "--model", model, "--input", inp, "--output", out, "--layouts", layouts, "--allreduce", "gloo",
           "--ignore-eos", "--no-tqdm", "--metrics-json", metrics, *extra]
    res = tb.run(cmd, master_port=port, timeout=1800)
    if any(r.returncode for r in res):
        raise RuntimeError(f"{layouts}: " + " | ".join(r.stderr.strip().splitlines()[-1] for r in res if r.stderr))
    line = next(ln for r in res for ln in r.stderr.splitlines() if ln.startswith("Throughput:"))
    m = re.search(r"([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s", line)
    with open(metrics) as f:
        met = json.load(f)
    for p in (out, metrics):
        os.unlink(p)
    return {"requests_per_second": float(m.group(1)), "tokens_per_second": float(m.group(2)),
            "output_tokens_per_second": float(m.group(3)), "transitions": len(met["transitions"]),
            "prefill_time_s": met["engine"]["prefill_time_s"], "decode_time_s": met["engine"]["decode_time_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--link-rate", default="20,100,1000", help="Mbit/s list (0: unlimited) or auto")
    p.add_argument("--layouts", default="tp2,pp2,P2->T2")
    p.add_argument("--dataset-name", default="arxiv-like", choices=["arxiv-like", "sharegpt-like", "fixed"])
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--length-scale", type=float, default=0.05)
    p.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.txt")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- more seesaw-mc generate options")
    a = p.parse_args()
    why = netns.available()
    if why:
        print(f"sweep: {why}", file=sys.stderr)
        return 2
    rates = [round(auto_rate_mbit(), 1)] if a.link_rate == "auto" else [float(x) for x in a.link_rate.split(",")]
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
        for rate in rates:
            with netns.Testbed(2, rate_mbit=rate or None) as tb:
                row = {"link_mbit": rate or None}
                for lay in layouts:
                    port += 1
                    row[lay] = run_one(tb, a.model, inp, lay, port, extra)
                    print(f"link {rate or 'unlimited'} Mbit/s  {lay:>8}: {row[lay]['tokens_per_second']:8.1f} tok/s "
                          f"({row[lay]['transitions']} transitions)", flush=True)
            rows.append(row)
    finally:
        os.unlink(inp)
    statics = [x for x in layouts if "->" not in x]
    lines = [f"{a.dataset_name} x{a.length_scale}, {a.num_prompts} requests, 2 hosts x 1 rank, total tokens/s",
             f"{'link Mbit/s':>12} " + " ".join(f"{x:>10}" for x in layouts) + "   seesaw / best static"]
    for row in rows:
        best = max(row[x]["tokens_per_second"] for x in statics) if statics else None
        seesaw = [x for x in layouts if "->" in x]
        ratio = (f"{row[seesaw[0]]['tokens_per_second'] / best:.2f}x" if seesaw and best else "")
        lines.append(f"{row['link_mbit'] or 'unlimited':>12} " + " ".join(
            f"{row[x]['tokens_per_second']:>10.1f}" for x in layouts) + f"   {ratio}")
    text = "\n".join(lines)
    print(text)
    if a.output:
        with open(a.output + ".json", "w") as f:
            json.dump({"rates": rates, "layouts": layouts, "dataset": a.dataset_name, "length_scale": a.length_scale,
                       "num_prompts": a.num_prompts, "matmul_flops_1thread": matmul_flops(), "rows": rows}, f, indent=2)
        with open(a.output + ".txt", "w") as f:
            f.write(text + "\n")
        plot(a.output + ".png", rows, layouts, lines[0])
    return 0


def plot(path: str, rows, layouts, title: str) -> None:
    """Fig. 14-style: throughput of each layout against the link rate (unlimited drawn last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for lay in layouts:
        ax.plot(xs, [r[lay]["tokens_per_second"] for r in rows], marker="o", label=lay,
                linewidth=2.5 if "->" in lay else 1.5)
    ax.set_xticks(xs, [f"{r['link_mbit']:g}" if r["link_mbit"] else "loopback" for r in rows])
    ax.set_xlabel("link rate between the 2 hosts (Mbit/s)")
    ax.set_ylabel("total tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
