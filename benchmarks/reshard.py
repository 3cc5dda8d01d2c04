"""Cost of a Seesaw transition (prefill layout <-> decode layout) and memory per rank.

For 2 ranks (P2->T2) and 4 ranks (P4->T4) on a random Llama of about 57M parameters, the
driver launches torchrun; each rank fills its KV cache, then plays what a Seesaw cycle does:
offload the prefill layout's KV to the host tier, switch to decode, swap the KV back in (now
in the decode layout), switch back. Reported per rank (medians): a transition's time for
process groups, weights and the barrier, and the weight bytes it copies; each KV swap's time,
bytes and ratio to a plain memcpy of the same bytes on the same rank, timed in the same
process with every rank copying at once (as in a swap). Memory: RSS and PSS per rank against the size of the weights (the master
copy is shared per node, so the node's PSS should hold the weights about once).

    python benchmarks/reshard.py [--ranks 2,4] [--output-json benchmarks/results/reshard.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build_model(path: str) -> None:
    import torch
    import transformers as tf

    tok_dir = os.path.join(os.path.dirname(HERE), "tests")
    sys.path.insert(0, tok_dir)
    from tiny_models import build_tokenizer

    build_tokenizer(path)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)


def mem_kb(field: str, path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mapping_kb(marker: str) -> dict:
    """Rss and Pss (kB) of this process's mappings whose file name contains `marker`."""
    out, inside = {"Rss": 0, "Pss": 0}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and not first.endswith(":"):
                inside = marker in line
            elif inside and first[:-1] in out:
                out[first[:-1]] += int(line.split()[1])
    return out


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from seesaw_mc import LLM

    warnings.filterwarnings("ignore")
    llm = LLM(a.model, prefill_layout=a.prefill, decode_layout=a.decode, num_device_blocks=a.blocks,
              num_host_blocks=a.blocks, block_size=16)
    runner = llm.engine.runner
    # Touch the weights in both layouts (the memory figures below count touched pages).
    from seesaw_mc import SamplingParams

    llm.generate([{"prompt_token_ids": list(range(100, 164))}] * 4, SamplingParams(temperature=0, max_tokens=4),
                 use_tqdm=False)
    runner.activate("prefill")
    for k, v in runner.kv_views["prefill"].layers:  # resident KV to hand over, pages touched
        k.normal_()
        v.normal_()
    pairs = [(b, b) for b in range(a.blocks)]
    recs = {"prefill->decode": [], "decode->prefill": []}
    swaps = {"to_host": [], "from_host": []}
    for _ in range(a.repeats):
        # A prefill phase offloads its KV to the host tier; decode swaps it back in.
        t = time.perf_counter()
        runner.kv.swap_out(pairs)
        swaps["to_host"].append(time.perf_counter() - t)
        recs["prefill->decode"].append(runner.activate("decode"))
        t = time.perf_counter()
        runner.kv.swap_in(pairs)
        swaps["from_host"].append(time.perf_counter() - t)
        recs["decode->prefill"].append(runner.activate("prefill"))
    out = {"rank": dist.get_rank(), "directions": {}, "swaps": {}}
    for d, rs in recs.items():
        out["directions"][d] = {k: statistics.median([r[k] for r in rs])
                                for k in ("weights_s", "kv_drain_s", "barrier_s", "total_s", "weight_bytes_copied")}
    for d, ts in swaps.items():
        views = runner.kv_views["prefill" if d == "to_host" else "decode"]
        nbytes = sum(2 * k[: a.blocks].numel() * k.element_size() for k, _ in views.layers)
        src = torch.empty(nbytes, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(5):
            # All ranks copy at once, as they do when swapping: on a small box they share the
            # memory bandwidth, and the reference must see the same contention.
            dist.barrier()
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        med = statistics.median(ts)
        out["swaps"][d] = {"seconds": med, "bytes": nbytes, "memcpy_s": statistics.median(times),
                           "ratio_to_memcpy": med / statistics.median(times)}
    out["rss_mb"] = mem_kb("VmRSS", "/proc/self/status") / 1024
    out["pss_mb"] = mem_kb("Pss", "/proc/self/smaps_rollup") / 1024
    out["weights_mb"] = runner.weights.master.nbytes / 2**20
    w = mapping_kb("-weights-")
    out["weights_rss_mb"], out["weights_pss_mb"] = w["Rss"] / 1024, w["Pss"] / 1024
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, out)
    if dist.get_rank() == 0:
        with open(a.worker_out, "w") as f:
            json.dump(gathered, f)


def drive(a) -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model
        if model is None:
            model = os.path.join(tmp, "llama57m")
            build_model(model)
        for n in [int(x) for x in a.ranks.split(",")]:
            pre, dec = f"pp{n}", f"tp{n}"
            out = os.path.join(tmp, f"r{n}.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--model", model, "--prefill", pre, "--decode", dec, "--blocks", str(a.blocks),
                   "--repeats", str(a.repeats), "--worker-out", out]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout[-2000:], r.stderr[-6000:])
                return 1
            ranks = json.load(open(out))
            results[f"P{n}->T{n}"] = ranks
            print(f"\n== P{n}->T{n}: {n} ranks, weights {ranks[0]['weights_mb']:.0f} MB, "
                  f"KV {a.blocks} blocks of 16 tokens resident")
            print(f"{'rank':>4} {'transition':>16} {'kv drain ms':>11} {'weights ms':>11} {'barrier ms':>11} "
                  f"{'weight MB copied':>17}")
            for rk in ranks:
                for d, m in rk["directions"].items():
                    print(f"{rk['rank']:>4} {d:>16} {m['kv_drain_s'] * 1e3:>11.2f} {m['weights_s'] * 1e3:>11.2f} "
                          f"{m['barrier_s'] * 1e3:>11.2f} {m['weight_bytes_copied'] / 2**20:>17.1f}")
            print(f"{'rank':>4} {'KV swap':>16} {'MB':>8} {'ms':>8} {'memcpy ms':>10} {'ratio':>6}")
            for rk in ranks:
                for d, m in rk["swaps"].items():
                    print(f"{rk['rank']:>4} {d:>16} {m['bytes'] / 2**20:>8.1f} {m['seconds'] * 1e3:>8.2f} "
                          f"{m['memcpy_s'] * 1e3:>10.2f} {m['ratio_to_memcpy']:>6.2f}")
            wpss = sum(rk["weights_pss_mb"] for rk in ranks)
            print("process RSS per rank MB: " + ", ".join(f"{rk['rss_mb']:.0f}" for rk in ranks)
                  + "; PSS: " + ", ".join(f"{rk['pss_mb']:.0f}" for rk in ranks))
            print("master-weights mapping per rank, RSS MB: " + ", ".join(f"{rk['weights_rss_mb']:.0f}" for rk in ranks)
                  + "; PSS MB: " + ", ".join(f"{rk['weights_pss_mb']:.0f}" for rk in ranks)
                  + f"; node total PSS {wpss:.0f} MB for {ranks[0]['weights_mb']:.0f} MB of weights "
                  f"(private copies would be {n * ranks[0]['weights_mb']:.0f} MB)")
    if a.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(a.output_json)), exist_ok=True)
        with open(a.output_json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder; default: a random 57M-parameter Llama")
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output-json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefill", default="pp2", help=argparse.SUPPRESS)
    p.add_argument("--decode", default="tp2", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0
    return drive(a)


if __name__ == "__main__":
    raise SystemExit(main())
