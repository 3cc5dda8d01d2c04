"""Runs the GPU checks (checks.py) one by one under time limits and keeps their JSON record.

- Each check gets a time limit (SIGALRM), clamped to what is left of the whole run's budget,
  and a result dict it fills as it goes: a timeout or an exception keeps what it had found.
- The JSON is rewritten after every check. A check that kills the process (a segfault, a
  sticky CUDA error) is left "running" there; the next start (--resume, as gpu_check.sh
  loops) marks it "crashed" and goes on with the rest, so one check never stops the others.
- Statuses: pass / fail (checks that assert), report (figures only), error, timeout,
  crashed, not_run (the budget ran out first).

The module imports only the standard library at the top, so that --finalize and --table
run in a blink wherever the JSON is.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback

SCHEMA = 1
BAD = ("fail", "error", "timeout", "crashed", "not_run")
RESTART = 3  # exit code: the process must restart (CUDA context lost) to run the rest


class CheckTimeout(BaseException):
    """Not an Exception: library code that catches Exception (a kernel candidate that fails
    to build, say) must not swallow the time limit."""


def _alarm(signum, frame):
    raise CheckTimeout()


def _write(path: str, rec: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2, default=str)
    os.replace(tmp, path)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "megatron-core", "deepspeed", "triton", "einops", "pydantic", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{e.__class__.__name__}: {text.splitlines()[0] if text else ''}"[:300]


def run_one(ctx, name: str, fn, limit: float) -> dict:
    res: dict = {}
    rec = {"status": "running", "limit_s": round(limit, 1), "result": res}
    t0, c0 = time.perf_counter(), time.process_time()
    ctx.check_deadline = time.time() + limit  # for subprocesses the check starts
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, limit))
    try:
        rec["status"] = fn(ctx, res)
    except CheckTimeout:
        rec["status"], rec["error"] = "timeout", f"past its limit of {limit:.0f} s"
    except Exception as e:  # a check's failure is its record, never the run's
        rec["status"], rec["error"] = "error", _one_line(e)
        rec["traceback"] = traceback.format_exc()[-3000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["cpu_s"] = round(time.process_time() - c0, 2)  # of this process, all threads
    if rec["status"] in ("timeout", "error"):
        ctx.drop_llms()  # an engine interrupted mid-step is in no state to reuse
    return rec


def _cuda_lost(rec: dict) -> bool:
    err = rec.get("error", "")
    return rec["status"] == "error" and ("CUDA error" in err or "AcceleratorError" in err or "device-side" in err)


def summarize(doc: dict) -> dict:
    by = {}
    for name, rec in doc["checks"].items():
        by.setdefault(rec["status"], []).append(name)
    doc["summary"] = by
    doc["ok"] = not any(s in by for s in BAD + ("running", "pending"))
    return doc


def run(checks, argv=None) -> int:
    """checks: [(name, fn(ctx, res) -> status, gpu_limit_s, dry_limit_s)]."""
    p = argparse.ArgumentParser(description="seesaw-mc GPU checks (see benchmarks/gpu/README.md)")
    p.add_argument("--out", required=True, help="folder for gpu_check.json")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: everything but what needs CUDA")
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which every check must end")
    p.add_argument("--only", default=None, help="comma-separated check names")
    p.add_argument("--resume", action="store_true", help="keep the finished checks of an earlier start")
    p.add_argument("--finalize", action="store_true", help="mark what never finished, write the summary, exit")
    p.add_argument("--table", action="store_true", help="print gpu_check.json as a Markdown table")
    a = p.parse_args(argv)
    path = os.path.join(a.out, "gpu_check.json")
    if a.table:
        from table import markdown

        with open(path) as f:
            print(markdown(json.load(f)))
        return 0
    names = [c[0] for c in checks]
    only = a.only.split(",") if a.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown checks {unknown} (known: {', '.join(names)})")
    doc = None
    if (a.resume or a.finalize) and os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    if doc is None:
        doc = {"schema": SCHEMA, "mode": "dry-run" if a.dry_run else "gpu", "started": time.time(),
               "checks": {n: {"status": "pending"} for n in names if n in only}}
    late = a.deadline is not None and time.time() >= a.deadline
    for rec in doc["checks"].values():
        if rec["status"] == "running":  # the process died inside it
            rec["status"] = "crashed"
            rec.setdefault("error", "killed at the run's time budget" if late
                           else "the process died during this check (see gpu_check.log)")
    if a.finalize:
        for rec in doc["checks"].values():
            if rec["status"] == "pending":
                rec.update(status="not_run", error="the run's time budget ran out first")
        _write(path, summarize(doc))
        return 0 if doc["ok"] else 1
    return _run_pending(checks, a, doc, path)


def _run_pending(checks, a, doc: dict, path: str) -> int:
    os.makedirs(a.out, exist_ok=True)
    doc["versions"] = _versions()
    try:
        from context import Ctx

        ctx = Ctx(dry_run=a.dry_run)
        doc["device"] = ctx.describe()
    except (Exception, SystemExit) as e:  # an import that fails on the GPU machine: say which, in the JSON too
        doc["fatal"] = _one_line(e)
        doc["traceback"] = traceback.format_exc()[-3000:]
        _write(path, doc)
        raise
    _write(path, doc)
    for name, fn, gpu_limit, dry_limit in checks:
        rec = doc["checks"].get(name)
        if rec is None or rec["status"] != "pending":
            continue
        limit = dry_limit if a.dry_run else gpu_limit
        if a.deadline is not None:
            left = a.deadline - time.time()
            if left < 10:
                break
            limit = min(limit, left - 5)
        print(f"== {name} (limit {limit:.0f} s)", flush=True)
        doc["checks"][name] = {"status": "running", "started": time.time()}
        _write(path, doc)
        rec = doc["checks"][name] = run_one(ctx, name, fn, limit)
        print(f"== {name}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['error']})" if "error" in rec else ""),
              flush=True)
        _write(path, doc)
        if _cuda_lost(rec):
            return RESTART
    doc["elapsed_s"] = round(time.time() - doc["started"], 1)
    _write(path, summarize(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit("run checks.py, not harness.py")
