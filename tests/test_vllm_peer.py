"""vLLM's CPU build as an in-run peer (benchmarks/throughput.py --backends seesaw,vllm): both engines give the
same greedy tokens. The peer is never a test dependency: without its venv (`make peers`) this skips."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.environ.get("SEESAW_VLLM_PYTHON", os.path.join(ROOT, ".cache", "peers", "vllm", "bin", "python"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.exists(PEER), reason=f"vLLM peer not installed ({PEER} is missing; `make peers` builds it)")]


@pytest.fixture(scope="module")
def head64_model(tmp_path_factory):
    """vLLM's CPU attention takes head sizes from 32 up (tiny_models' usual 16 is refused): 2 layers,
    hidden 128, GQA 2/1, head_dim 64."""
    from tiny_models import build_model

    return build_model("llama", str(tmp_path_factory.mktemp("models") / "llama64"), layers=2, hidden=128,
                       heads=2, kv_heads=1, seed=4)


@pytest.mark.timeout(1800)  # vLLM's start-up (dynamo tracing, warm-up) took 300 s on a loaded 2-core machine
def test_vllm_gives_our_greedy_tokens(head64_model, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"), "--model", head64_model,
                        "--dataset-name", "fixed", "--input-len", "24", "--output-len", "8", "--num-prompts", "4",
                        "--dtype", "float32", "--backends", "seesaw,vllm", "--vllm-python", PEER, "--repeats", "2",
                        "--output-json", str(out)], capture_output=True, text=True, timeout=1700,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [b["backend"] for b in res["results"]] == ["seesaw", "vllm"]
    assert res["identical_vs_vllm"] == 4, r.stdout
    assert all(b["whole_process_output_tokens_per_second"] > 0 for b in res["results"])
    assert all(len(b["output_tokens_per_second_runs"]) == 2 for b in res["results"])  # one start-up, 2 runs
    assert "ratio_vs_vllm" in res and "ratio_whole_process_vs_vllm" in res
