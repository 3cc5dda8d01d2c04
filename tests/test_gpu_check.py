"""Issue 16: the prepared GPU check (benchmarks/gpu/) rehearsed on CPU.

`gpu_check.sh --dry-run` runs every check's code at tiny sizes on CPU, so that the one GPU
run a lent machine allows cannot fail on a typo; its token and byte assertions hold on CPU
too (our tokens against HF generate, the host tier's round trip). The harness keeps going
past a failing, hanging or crashing check.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(REPO, "benchmarks", "gpu")
sys.path.insert(0, GPU)

import harness  # noqa: E402

CHECKS = ["token_exact", "attention", "host_tier", "decode_roofline", "prefill", "throughput", "kernels"]


@pytest.mark.slow
def test_dry_run_writes_every_check(tmp_path):
    out = tmp_path / "out"
    # No wheels, as in CI (they are collected only for a GPU run): the installed packages run.
    env = dict(os.environ, PYTHON=sys.executable, SEESAW_WHEELS=str(tmp_path / "no-wheels"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(GPU, "gpu_check.sh"), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["mode"] == "dry-run" and doc["ok"] and doc["device"]["device"] == "cpu"
    assert list(doc["checks"]) == CHECKS
    st = {n: r["status"] for n, r in doc["checks"].items()}
    assert st == {"token_exact": "pass", "attention": "pass", "host_tier": "pass", "decode_roofline": "report",
                  "prefill": "report", "throughput": "report", "kernels": "report"}, doc["checks"]
    res = {n: r["result"] for n, r in doc["checks"].items()}
    for family in ("llama", "mistral", "qwen2"):  # greedy fp32 tokens equal HF generate's; bf16 is reported
        assert res["token_exact"][family]["float32"]["equal"]
        assert "equal" in res["token_exact"][family]["bfloat16"] and "bf16_vs_fp32_ours" in res["token_exact"][family]
    assert "skipped" in res["token_exact"]["llama-1b"]
    for dt in ("float32", "bfloat16"):
        assert res["attention"][dt]["decode_max_abs_diff"] <= res["attention"][dt]["tolerance"]
    tier = res["host_tier"]
    assert tier["round_trip"]["tokens_equal"] and tier["round_trip"]["blocks"] > 0
    assert tier["copy_rates"]["round_trip_equal"] and tier["weight_reload"]["tokens_equal"]
    assert set(res["decode_roofline"]["batches"]) == {"1", "4"}
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in res["decode_roofline"]["batches"].values())
    assert res["prefill"]["tokens"] == 2 * 48 and res["prefill"]["TFLOPs"] > 0
    assert res["throughput"]["seesaw"]["num_output_tokens"] == res["throughput"]["hf"]["num_output_tokens"]
    from seesaw_mc.model import fused_ops

    # On CPU, RMSNorm runs in the fused ops of our extension where it built (model/kernels.py).
    assert res["kernels"]["auto"]["chosen"] == ("cpu-op" if fused_ops.available(torch.float32)[0] else "torch")
    assert res["kernels"]["deepspeed"]["skipped"] == {"deepspeed": "CUDA-only"}
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {n} |" in table for n in CHECKS)
    assert "== gpu_check done" in (out / "gpu_check.log").read_text()


class _Ctx:
    dropped = 0

    def drop_llms(self):
        self.dropped += 1


def test_a_check_that_raises_or_hangs_is_recorded_and_the_next_runs():
    ctx = _Ctx()

    def raises(ctx, res):
        res["found"] = 1
        raise RuntimeError("boom\nmore")

    def hangs(ctx, res):
        res["started"] = True
        time.sleep(30)

    rec = harness.run_one(ctx, "raises", raises, 5)
    assert rec["status"] == "error" and rec["error"] == "RuntimeError: boom" and rec["result"] == {"found": 1}
    rec = harness.run_one(ctx, "hangs", hangs, 1)
    assert rec["status"] == "timeout" and rec["result"] == {"started": True} and rec["seconds"] < 5
    assert harness.run_one(ctx, "fine", lambda c, r: "pass", 5)["status"] == "pass"
    assert ctx.dropped == 2  # engines interrupted mid-step are not reused


def test_the_time_limit_is_not_swallowed_by_except_exception():
    def tolerant(ctx, res):
        try:
            time.sleep(30)
        except Exception:  # e.g. a kernel candidate skipped "with its reason"
            res["swallowed"] = True
        return "report"

    rec = harness.run_one(_Ctx(), "tolerant", tolerant, 1)
    assert rec["status"] == "timeout" and "swallowed" not in rec["result"]


def test_finalize_marks_a_crash_and_what_never_ran(tmp_path):
    """A check that killed its process is left 'running' in the JSON: the next start marks it
    crashed; checks the budget never reached are not_run, and the run is not ok."""
    doc = {"schema": 1, "mode": "gpu", "started": time.time(),
           "checks": {"a": {"status": "pass", "result": {}}, "b": {"status": "running"}, "c": {"status": "pending"}}}
    (tmp_path / "gpu_check.json").write_text(json.dumps(doc))
    checks = [(n, None, 1, 1) for n in "abc"]
    assert harness.run(checks, ["--out", str(tmp_path), "--finalize"]) == 1
    got = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [got["checks"][n]["status"] for n in "abc"] == ["pass", "crashed", "not_run"]
    assert got["summary"] == {"pass": ["a"], "crashed": ["b"], "not_run": ["c"]} and not got["ok"]


def test_bad_usage_is_refused_in_one_line(tmp_path):
    proc = subprocess.run(["bash", os.path.join(GPU, "gpu_check.sh"), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("usage:")
    with pytest.raises(SystemExit):
        harness.run([("a", None, 1, 1)], ["--out", str(tmp_path), "--only", "nope"])
