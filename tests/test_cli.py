"""The CLI: a JSONL batch job end to end, and one clear error line for every bad input."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from seesaw_mc import LLM, SamplingParams


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("SEESAW_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "seesaw_mc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def assert_one_error_line(r, code, *fragments):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("seesaw-mc: error: "), lines[0]
    assert "Traceback" not in r.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_generate_jsonl_end_to_end(tiny_models, tmp_path):
    model = tiny_models["llama"]
    rows = [
        {"id": "a", "prompt": "the quick brown fox", "max_tokens": 6},
        {"prompt_token_ids": [5, 6, 7, 8], "max_tokens": 5, "temperature": 0.8, "seed": 3},
        {"id": "c", "messages": [{"role": "user", "content": "summary of the model"}], "max_tokens": 4},
        {"custom_id": "req-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "paris london", "max_tokens": 7}},
        {"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 3}},
        # Two prompts that share two 16-token blocks: the second computes only its own tail.
        {"id": "s1", "prompt_token_ids": list(range(3, 40)) + [50], "max_tokens": 3},
        {"id": "s2", "prompt_token_ids": list(range(3, 40)) + [60, 61], "max_tokens": 3},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(out), "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "Throughput:" in r.stderr and "requests/s" in r.stderr
    saved = re.search(r"Prefix cache: (\d+) prompt tokens not computed", r.stderr)
    assert saved and int(saved.group(1)) >= 32, r.stderr  # s2's (the chat template may share some too)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(recs) == 7
    plain = {rec["id"]: rec for rec in recs if "custom_id" not in rec}
    openai = {rec["custom_id"]: rec for rec in recs if "custom_id" in rec}
    assert set(plain) == {"a", 2, "c", "s1", "s2"} and set(openai) == {"req-1", "req-2"}
    assert len(plain["a"]["token_ids"]) == 6 and plain["a"]["finish_reason"] == "length"
    assert plain["a"]["usage"]["completion_tokens"] == 6
    body = openai["req-1"]["response"]["body"]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 7
    assert openai["req-2"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert openai["req-2"]["error"] is None
    # Same tokens as the Python API on the same prompt.
    llm = LLM(model)
    ref = llm.generate("the quick brown fox", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert plain["a"]["token_ids"] == ref.outputs[0].token_ids and plain["a"]["text"] == ref.outputs[0].text


def test_missing_model_dir(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    r = run_cli("generate", "--model", str(tmp_path / "nope"), "--input", inp, "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 3, "does not exist")


def test_corrupt_model_weights(tiny_models, tmp_path):
    model = str(tmp_path / "corrupt")
    shutil.copytree(tiny_models["llama"], model)
    st = os.path.join(model, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(os.path.getsize(st) // 2)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 3, "model.safetensors", "corrupt or truncated")


def test_unknown_architecture(tiny_models, tmp_path):
    model = str(tmp_path / "bloomish")
    shutil.copytree(tiny_models["llama"], model)
    cfg_path = os.path.join(model, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["BloomForCausalLM"]  # ALiBi
    json.dump(cfg, open(cfg_path, "w"))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    r = run_cli("generate", "--model", model, "--input", inp, "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 3, "unsupported architecture 'BloomForCausalLM'")


@pytest.mark.parametrize("rows,fragments", [
    ([{"prompt": "ok"}, {"prompt": "ok2"}, '{"prompt": "broken'], ["line 3: invalid JSON"]),
    ([{"prompt": "ok"}, "[1, 2]"], ["line 2: expected a JSON object"]),
    ([{"prompt": "x", "temperature": -1}], ["line 1: SamplingParams.temperature must be a number >= 0"]),
    ([{"prompt": "x", "top_p": 1.5}], ["line 1: SamplingParams.top_p must be in (0, 1]"]),
    ([{"prompt": "x", "max_tokens": "many"}], ["line 1: SamplingParams.max_tokens"]),
    ([{"prompt": "x", "colour": "red"}], ["line 1: unknown field 'colour'"]),
    ([{"prompt": ""}], ["line 1: empty prompt"]),
    ([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], ["line 2: duplicate id 1"]),
    ([{"max_tokens": 3}], ["line 1: needs exactly one of 'prompt'"]),
])
def test_bad_input_lines(tiny_models, tmp_path, rows, fragments):
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    r = run_cli("generate", "--model", tiny_models["llama"], "--input", inp, "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 2, *fragments)
    assert not (tmp_path / "o.jsonl").exists()  # refused before any work


def test_invalid_utf8_line(tiny_models, tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    r = run_cli("generate", "--model", tiny_models["llama"], "--input", str(p), "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 2, "line 2: not valid UTF-8")


def test_prompt_longer_than_context(tiny_models, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}, {"prompt_token_ids": [5] * 600}])
    r = run_cli("generate", "--model", tiny_models["llama"], "--input", inp, "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 2, "line 2:", "prompt of 600 tokens does not fit", "512")


def test_missing_input_file(tiny_models, tmp_path):
    r = run_cli("generate", "--model", tiny_models["llama"], "--input", str(tmp_path / "none.jsonl"),
                "--output", str(tmp_path / "o.jsonl"))
    assert_one_error_line(r, 2, "cannot read input file")


def test_api_errors_are_valueerrors(tiny_models):
    llm = LLM(tiny_models["llama"])
    with pytest.raises(ValueError, match="does not fit the model's context"):
        llm.generate({"prompt_token_ids": [5] * 600}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate({"prompt_token_ids": [5, 10**6]}, use_tqdm=False)
    # A bad prompt in a batch leaves nothing queued behind it.
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="unknown engine option 'colour'"):
        LLM(tiny_models["llama"], colour=1)
    with pytest.raises(ValueError, match="max_model_len 100000 exceeds"):
        LLM(tiny_models["llama"], max_model_len=100000)


def test_a_failed_command_releases_its_world_of_one():
    """convert initialises a world of one (gloo) to load a checkpoint. When it then fails, the
    group is torn down before the exit, as on success: left to interpreter exit, gloo's threads
    once aborted a corrupt checkpoint's clean one-line exit (SIGABRT, exit -6 instead of 3)."""
    code = """
import sys, torch.distributed as dist
from seesaw_mc import cli
from seesaw_mc.errors import ModelError
from seesaw_mc.parallel import megatron_adapter as mc

def failing(a):
    mc.init_distributed()
    assert dist.is_initialized()
    raise ModelError("a corrupt shard")

cli.cmd_convert = failing
rc = cli.main(["convert", "--input", "in", "--output", "out"])
print(rc, dist.is_initialized())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "False"]
    assert r.stderr.strip().splitlines()[-1] == "seesaw-mc: error: a corrupt shard"
