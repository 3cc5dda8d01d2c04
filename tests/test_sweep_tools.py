"""The test bed sweep's arithmetic and the vLLM peer's network-only patch, without a test bed:
the link volume each layout must send, the names auto's choices map to, the regime labels, and
that benchmarks/peers/no_shm turns vLLM's shared-memory check off (on a stand-in module)."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "testbed"))
import sweep  # noqa: E402

from seesaw_mc.config import Layout  # noqa: E402
from seesaw_mc.model_spec import ModelShape  # noqa: E402

M = ModelShape(name="t", layers=4, hidden=2048, ffn=5632, heads=16, kv_heads=16, vocab=8192, dtype_bytes=4)


def test_expected_bytes_per_layout():
    tp2, pp2 = Layout.parse("tp2"), Layout.parse("pp2")
    act = 2048 * 4
    # TP2: the embedding's and 2 per layer, a ring all-reduce of N bytes sends N from each of 2 hosts
    assert sweep.expected_bytes(M, tp2, tp2, 100, 0) == 100 * 9 * act * 2
    # PP2: each token's activations once to the next stage
    assert sweep.expected_bytes(M, pp2, pp2, 100, 10) == 110 * act
    # a pair: prompts in its prefill layout, generated tokens in its decode layout
    assert sweep.expected_bytes(M, pp2, tp2, 100, 10) == 100 * act + 10 * 9 * act * 2
    assert sweep.expected_bytes(M, Layout.parse("dp2"), Layout.parse("dp2"), 100, 10) == 0


@pytest.mark.parametrize("line,rec,want", [
    ("tp2", {}, ("tp2", "tp2")),
    ("vllm pp2", {}, ("pp2", "pp2")),
    ("P2->T2", {}, ("pp2", "tp2")),
    ("auto", {"auto": "P2->T2"}, ("pp2", "tp2")),
    ("auto", {"auto": "D2"}, ("dp2", "dp2")),
])
def test_line_layouts(line, rec, want):
    assert sweep.line_layouts(line, rec) == tuple(Layout.parse(x) for x in want)


def test_line_layouts_of_an_unknown_auto_choice_is_none():
    assert sweep.line_layouts("auto", {}) is None


def test_regime_labels():
    a10 = {"decode_bw": 0.1, "decode_lat": 0.1, "prefill_bw": 0.1, "prefill_lat": 0.01}
    lat = sweep.regime_label({"decode_bw": 0.05, "decode_lat": 0.3, "prefill_bw": 0.2, "prefill_lat": 0.0}, a10)
    assert lat.startswith("latency-bound") and "lat 3.0" in lat and "prefill bw 2.0" in lat
    assert sweep.regime_label({"decode_bw": 0.4, "decode_lat": 0.1, "prefill_bw": 0.1, "prefill_lat": 0}, a10) \
        .startswith("bandwidth-bound")
    assert sweep.regime_label({"decode_bw": 0.01, "decode_lat": 0.01, "prefill_bw": 0.1, "prefill_lat": 0}, a10) \
        .startswith("compute-bound")


def test_regime_grows_with_a_slower_link():
    hw = sweep.planner.HARDWARE_PRESETS["A10"]
    slow = sweep.dataclasses.replace(hw, link_bw=hw.link_bw / 10)
    fast, slowr = sweep.regime(M, hw, 32, 2048), sweep.regime(M, slow, 32, 2048)
    assert slowr["decode_bw"] == pytest.approx(10 * fast["decode_bw"])
    assert slowr["decode_lat"] == pytest.approx(fast["decode_lat"])


def test_no_shm_patch_answers_no(tmp_path):
    """The patch replaces vLLM's "do all ranks share one segment name" check when (and only when)
    vLLM imports its CPU communicator: a stand-in module of that name shows it."""
    pkg = tmp_path / "vllm" / "distributed" / "device_communicators"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "vllm", tmp_path / "vllm" / "distributed", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "cpu_communicator.py").write_text(textwrap.dedent("""
        class CpuCommunicator:
            def _all_group_ranks_share_shm_group_name(self):
                return True
    """))
    code = ("from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator as C; "
            "print(C()._all_group_ranks_share_shm_group_name())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "benchmarks", "peers", "no_shm"),
                                                       str(tmp_path)]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "False", out.stderr
    env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "True", out.stderr


def _doc(lines, rows):
    cell = lambda v: {"median": v, "min": v - 1, "max": v + 1,  # noqa: E731
                      "runs": [{"link_bytes": 2e6, "expected_bytes": 1e6, "identical": 16}]}
    return {"lines": lines, "dataset": "arxiv-like", "num_prompts": 16, "length_scale": 0.08, "output_scale": 0.25,
            "repeats": 3, "mean_input": 300, "mean_output": 50, "extra": [], "matmul_flops_1thread": 1e11,
            "model": "m", "rates": [r[0] for r in rows if r[0]],
            "rows": [{"link_mbit": rate, "loopback": rate is None, "predicted": {}, "link_measured": None,
                      "regime": {"label": "r"}, **{x: cell(v) for x, v in zip(lines, vals)}}
                     for rate, vals in rows]}


def test_merge_settings_that_ran_other_lines(tmp_path):
    """--merge joins settings whose vLLM lines differ: a line a setting did not run shows '-'."""
    import json

    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps(_doc(["tp2", "P2->T2", "vllm tp2", "vllm pp2"], [(418.3, [200, 280, 250, 170])])))
    b.write_text(json.dumps(_doc(["tp2", "P2->T2", "vllm tp2"], [(100.0, [90, 200, 80]), (None, [270, 250, 300])])))
    out = tmp_path / "m"
    assert sweep.main(["--model", "m", "--merge", f"{a},{b}", "--output", str(out)]) == 0
    text = (tmp_path / "m.txt").read_text().splitlines()
    assert "vllm pp2" in text[1]
    rows = [ln.split() for ln in text[2:5]]
    assert rows[0][:2] == ["100", "Mbit/s"] and rows[0][-1] == "-"
    assert rows[1][:2] == ["418.3", "Mbit/s"] and rows[1][-2:] == ["170", "(169-171)"]
    assert rows[2][0] == "loopback" and rows[2][-1] == "-"
    assert any("1.12/1.12/1.12x vs vllm tp2" in ln for ln in text)  # 280 / 250 at 418.3 Mbit/s
    assert (tmp_path / "m.png").stat().st_size > 0
    c = tmp_path / "c.json"
    c.write_text(json.dumps(dict(_doc(["tp2"], [(0.0, [1])]), num_prompts=32)))
    with pytest.raises(SystemExit, match="another workload"):
        sweep.main(["--model", "m", "--merge", f"{a},{c}", "--output", str(out)])


def test_our_lines_take_turns_at_going_first(monkeypatch):
    """Repeat r starts at line r: over 3 repeats each of 3 lines runs once first, second and
    last. vLLM's line runs at the first repeat only; the result keeps the lines' order."""
    order = []
    monkeypatch.setattr(sweep, "run_loopback", lambda model, inp, line, extra: order.append(line) or {"l": line})
    monkeypatch.setattr(sweep, "run_vllm_loopback", lambda model, reqs, lay, repeats: [{"v": str(lay)}] * repeats)
    a = type("A", (), {"lines": ["tp2", "vllm tp2", "P2->T2", "auto"], "model": "m", "extra": [], "repeats": 3})()
    got = [sweep.run_point(a, [], "in.jsonl", None, True, 0, rep) for rep in range(3)]
    assert order == ["tp2", "P2->T2", "auto", "P2->T2", "auto", "tp2", "auto", "tp2", "P2->T2"]
    assert list(got[0]) == ["tp2", "vllm tp2", "P2->T2", "auto"] and len(got[0]["vllm tp2"]) == 3
    assert list(got[1]) == ["tp2", "P2->T2", "auto"]


FAKE_VLLM = '''
import json, os, time


class _Out:
    def __init__(self, n):
        self.outputs = [type("C", (), {"token_ids": list(range(n))})()]


class SamplingParams:
    def __init__(self, max_tokens, **kw):
        self.max_tokens = max_tokens


class LLM:
    def __init__(self, model, **kw):
        pass

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, params, use_tqdm=False):
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:  # when each rank generated
            f.write(json.dumps([os.environ["RANK"], len(prompts), time.time()]) + "\\n")
        return [_Out(p.max_tokens) for p in params]


__version__ = "fake"
'''


class _FakeTestbed:
    """Two 'hosts' as plain processes: what VllmSession needs of netns.Testbed."""

    n = 2

    def __init__(self, tmp_path):
        self.tmp, self.sent = tmp_path, 0

    def addr(self, i):
        return "127.0.0.1"

    def counters(self):
        self.sent += 1000
        return [{"tx": self.sent, "rx": 0}]

    def start(self, cmd, master_port, host_env, logs):
        fake = {"PYTHONPATH": str(self.tmp), "FAKE_VLLM_LOG": str(self.tmp / "gen.log")}
        return [subprocess.Popen(cmd, env=dict(host_env(i), **fake), stdout=logs[i], stderr=subprocess.STDOUT)
                for i in range(2)]


def _fake_vllm(tmp_path, monkeypatch):
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.setenv("SEESAW_VLLM_PYTHON", sys.executable)
    return _FakeTestbed(tmp_path)


def test_vllm_session_runs_each_repeat_when_asked(tmp_path, monkeypatch):
    """One start-up (warm-up included) before anything runs; then each repeat runs only when asked,
    on both ranks, with the bytes sent during it; the ranks exit after the last."""
    tb = _fake_vllm(tmp_path, monkeypatch)
    reqs = [type("R", (), {"prompt_token_ids": [1, 2, 3], "output_len": n})() for n in (4, 5)]
    sess = sweep.VllmSession(tb, str(tmp_path), reqs, Layout.parse("tp2"), 29999, repeats=2, network_only=False)
    gen = lambda: [json.loads(ln) for ln in (tmp_path / "gen.log").read_text().splitlines()]  # noqa: E731
    time.sleep(0.5)
    assert [g[1] for g in gen()] == [2, 2]  # the warm-up (2 requests) on both ranks, no repeat yet
    rec = sess.repeat(0)
    assert rec["token_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3, 4]] and rec["link_bytes"] == 1000
    assert rec["tokens_per_second"] == pytest.approx(15 / rec["generate_s"])
    time.sleep(0.5)
    assert len(gen()) == 4  # repeat 1 waits for its turn
    t_asked = time.time()
    sess.repeat(1)
    assert sorted(g[0] for g in gen()[4:]) == ["0", "1"] and min(g[2] for g in gen()[4:]) >= t_asked
    sess.close()
    assert all(p.returncode == 0 for p in sess.procs)


def test_vllm_session_that_dies_says_why(tmp_path, monkeypatch):
    tb = _fake_vllm(tmp_path, monkeypatch)
    (tmp_path / "vllm" / "__init__.py").write_text("raise SystemExit('no engine for you')")
    with pytest.raises(RuntimeError, match="no ready: no engine for you"):
        sweep.VllmSession(tb, str(tmp_path), [], Layout.parse("tp2"), 29999, repeats=1, network_only=False)


def test_vllm_lines_take_turns_on_the_test_bed(monkeypatch):
    """On the test bed vLLM's line is one more line in the rotation: it runs once per repeat."""
    order = []
    monkeypatch.setattr(sweep, "run_one", lambda tb, model, inp, line, port, extra: order.append(line) or {"l": line})
    sess = type("S", (), {"repeat": lambda self, r: order.append(f"vllm tp2 #{r}") or {"v": r}})()
    a = type("A", (), {"lines": ["tp2", "P2->T2", "vllm tp2"], "model": "m", "extra": [], "repeats": 3})()
    got = [sweep.run_point(a, [], "in.jsonl", 418.3, False, 0, rep, tb=None, vllm={"vllm tp2": sess})
           for rep in range(3)]
    assert order == ["tp2", "P2->T2", "vllm tp2 #0", "P2->T2", "vllm tp2 #1", "tp2", "vllm tp2 #2", "tp2", "P2->T2"]
    assert all(list(g) == a.lines and len(g["vllm tp2"]) == 1 for g in got)
