"""seesaw-mc against vLLM's CPU build, repeated: median (min-max) per layout and workload.

    python benchmarks/vs_vllm.py --model .cache/models/random-llama-30m --repeats 3 \
        --layouts 1,tp2,pp2 --workloads random,sharegpt-like:0.25,arxiv-like:0.1

Each layout and workload is one benchmarks/throughput.py --backends seesaw,vllm --repeats N (under torchrun
for tp2/pp2, vLLM with its mp executor at the same layout), so both engines see the same requests and cores:
each engine starts once (vLLM's start-up is a minute here) and generates the requests N times, the median of
those runs is its steady-state figure and min-max their spread. Which engine goes first alternates from one
invocation to the next, so drift on a shared machine hits both alike. Needs the peer venv (`make peers`).
Per-invocation JSON and the summary land in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIGURES = (("output_tokens_per_second", "generate"), ("whole_process_output_tokens_per_second", "whole process"),
           ("startup_s", "start-up s"))


def command(args, layout: str, workload: str, order: str, out: str) -> tuple:
    name, _, scale = workload.partition(":")
    bench = [os.path.join(HERE, "throughput.py"), "--model", args.model, "--dataset-name", name,
             "--length-scale", scale or "1", "--num-prompts", str(args.num_prompts), "--dtype", "float32",
             "--backends", order, "--repeats", str(args.repeats), "--output-json", out] + args.extra
    cores = len(os.sched_getaffinity(0))
    if layout == "1":
        return [sys.executable] + bench + ["--threads", str(cores)], {"OMP_NUM_THREADS": str(cores)}
    world = int(layout[2:])  # tp2, pp2
    per = str(max(1, cores // world))
    return ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] + bench
            + ["--layouts", layout, "--threads", per], {"OMP_NUM_THREADS": per})


def spread(xs) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def summarise(runs: list) -> dict:
    """runs: (layout, workload, throughput.py JSON) -> per layout/workload, per engine, median (min-max)."""
    table = {}
    for layout, workload, res in runs:
        row = table.setdefault(f"{layout} {workload}", {"seesaw": {}, "vllm": {}, "identical": []})
        for r in res["results"]:
            row[r["backend"]]["output_tokens_per_second"] = r["output_tokens_per_second_runs"]
            row[r["backend"]]["whole_process_output_tokens_per_second"] = [
                r["whole_process_output_tokens_per_second"]]
            row[r["backend"]]["startup_s"] = [r["startup_s"]]
            if "first_step_s" in r:
                row[r["backend"]]["first_step_s"] = [r["first_step_s"]]
            if r.get("ld_preload"):
                row[r["backend"]]["ld_preload"] = r["ld_preload"]
        row["identical"].append(f"{res['identical_vs_vllm']}/{res['num_prompts']}")
    for row in table.values():
        ours, peer = row["seesaw"]["output_tokens_per_second"], row["vllm"]["output_tokens_per_second"]
        # Each of our runs against the median of vLLM's: the ratio's spread is ours.
        row["ratio"] = spread([x / statistics.median(peer) for x in ours])
        for engine in ("seesaw", "vllm"):
            row[engine] = {k: spread(v) if isinstance(v, list) else v for k, v in row[engine].items()}
    return table


def show(table: dict) -> None:
    for name, row in table.items():
        for engine in ("seesaw", "vllm"):
            figs = "; ".join(f"{label} {row[engine][key]['median']:.1f} ({row[engine][key]['min']:.1f}-"
                             f"{row[engine][key]['max']:.1f})" for key, label in FIGURES)
            if "first_step_s" in row[engine]:
                figs += f"; first step at {row[engine]['first_step_s']['median']:.1f} s"
            if row[engine].get("ld_preload"):
                figs += f"; LD_PRELOAD {row[engine]['ld_preload']}"
            print(f"{name:28s} {engine:6s} output tokens/s: {figs}")
        r = row["ratio"]
        print(f"{name:28s} seesaw/vLLM (generate) {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}); "
              f"identical greedy tokens {', '.join(row['identical'])}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", default="1,tp2,pp2", help="1 (one process), tp2, pp2")
    p.add_argument("--workloads", default="random,sharegpt-like:0.25,arxiv-like:0.1",
                   help="dataset[:length scale], comma-separated (seesaw_mc/workloads.py)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "vs_vllm"))
    p.add_argument("extra", nargs="*", help="after --: more throughput.py flags")
    args = p.parse_args()
    for layout in args.layouts.split(","):
        if layout not in ("1", "tp2", "pp2"):
            p.error(f"--layouts: {layout!r} is not 1, tp2 or pp2")
    os.makedirs(args.out_dir, exist_ok=True)
    runs, i = [], 0
    for layout in args.layouts.split(","):
        for workload in args.workloads.split(","):
            order = "seesaw,vllm" if i % 2 == 0 else "vllm,seesaw"
            i += 1
            out = os.path.join(args.out_dir, f"{layout}_{workload.replace(':', 'x')}.json")
            cmd, env = command(args, layout, workload, order, out)
            print(f"== {layout}, {workload} ({order}, {args.repeats} runs each)", flush=True)
            subprocess.run(cmd, check=True, env=dict(os.environ, **env))
            with open(out) as f:
                runs.append((layout, workload, json.load(f)))
    table = summarise(runs)
    show(table)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump({"model": args.model, "num_prompts": args.num_prompts, "repeats": args.repeats, "table": table},
                  f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
