"""Bad input at scale (refused up front by default, one error record per bad line with
--skip-invalid) and a property-based test of the line parser."""
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seesaw_mc.errors import InputError
from seesaw_mc.inputs import parse_line
from seesaw_mc.sampling_params import SamplingParams
from test_cli import run_cli

BAD = [
    (b'{"prompt": "unclosed', "invalid JSON"),
    (b'{"prompt": ""}', "empty prompt"),
    (json.dumps({"prompt_token_ids": [5] * 600}).encode(), "does not fit the model's context of 512"),
    (b'{"prompt": "hi", "temprature": 0.5}', "unknown field 'temprature'"),
    (b'{"prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
    (b'{"prompt": "caf\xe9"}', "not valid UTF-8"),
    (b'[1, 2, 3]', "expected a JSON object"),
    (b'{"prompt_token_ids": [1, -2]}', "non-empty list of token ids"),
]


def big_input(path, n=10_000, seed=0):
    """n lines, one in ten bad (rotating through BAD), one duplicate id, one prompt that fits the
    model's context but never the (small) KV cache."""
    rng = random.Random(seed)
    expect = {}  # line -> None (served) or a fragment of its error
    with open(path, "wb") as f:
        for line in range(1, n + 1):
            if line % 10 == 0:
                raw, frag = BAD[(line // 10) % len(BAD)]
            elif line == 7:
                raw, frag = json.dumps({"id": 3, "prompt_token_ids": [9, 9]}).encode(), "duplicate id 3"
            elif line == 13:
                raw, frag = json.dumps({"prompt_token_ids": [7] * 400, "max_tokens": 1}).encode(), "never fit the KV"
            else:
                ids = [rng.randrange(3, 300) for _ in range(rng.randint(1, 6))]
                raw, frag = json.dumps({"id": line, "prompt_token_ids": ids, "max_tokens": 1}).encode(), None
            f.write(raw + b"\n")
            expect[line] = frag
    return expect


@pytest.mark.slow
def test_bad_input_at_scale(tiny_models, tmp_path):
    inp = tmp_path / "in.jsonl"
    expect = big_input(inp)
    out = tmp_path / "out.jsonl"
    common = ["generate", "--model", tiny_models["llama"], "--input", str(inp), "--output", str(out),
              "--num-device-blocks", "20"]  # 320 tokens of KV: the 400-token prompt can never fit
    r = run_cli(*common)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "1001 of 10000 input lines are invalid: line 7: duplicate id 3" in lines[0], lines[0]
    assert "line 10: " in lines[0] and "line 20: " in lines[0] and "--skip-invalid" in lines[0]
    assert not out.exists()  # refused before anything ran

    r = run_cli(*common, "--skip-invalid", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(recs) == 10_000  # one output line per input line
    served = {rec["id"]: rec for rec in recs if "error" not in rec}
    errors = {rec["error"]["line"]: rec for rec in recs if "error" in rec}
    assert len(served) + len(errors) == 10_000
    for line, frag in expect.items():
        if frag is None:
            assert len(served[line]["token_ids"]) == 1
        else:
            assert frag in errors[line]["error"]["message"], (line, errors[line])
    assert errors[13]["error"]["code"] == "capacity" and errors[10]["error"]["code"] == "invalid_request"
    assert errors[7]["id"] == 3 and 3 in served  # the duplicate's record keeps its id; the first one is served


# -- property-based: the parser returns a spec or raises InputError, nothing else -------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10)
keys = st.sampled_from(["id", "prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "top_p",
                        "top_k", "seed", "stop", "n", "logprobs", "custom_id", "body", "url", "method", "x"])
objects = st.dictionaries(keys, json_values, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(objects.map(lambda o: json.dumps(o).encode()), st.binary(max_size=40)))
def test_parser_never_crashes(raw):
    try:
        spec = parse_line(5, raw, SamplingParams())
    except InputError as e:
        assert str(e).startswith("line 5: ") and "\n" not in str(e)
        return
    assert spec.params is not None and spec.line == 5
    assert sum(x is not None for x in (spec.prompt, spec.prompt_token_ids, spec.messages)) == 1
    if spec.prompt_token_ids is not None:
        assert spec.prompt_token_ids and all(isinstance(t, int) and t >= 0 for t in spec.prompt_token_ids)


valid_plain = st.fixed_dictionaries(
    {"prompt_token_ids": st.lists(st.integers(0, 1000), min_size=1, max_size=8)},
    optional={"id": st.one_of(st.integers(0, 10**6), st.text(min_size=1, max_size=8)),
              "max_tokens": st.integers(1, 64), "seed": st.integers(0, 2**31),
              # (below 1e-5 a temperature means greedy, as in vLLM: not a round trip)
              "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 2))})


@settings(max_examples=200, deadline=None)
@given(valid_plain)
def test_valid_lines_round_trip(obj):
    spec = parse_line(3, json.dumps(obj).encode(), SamplingParams())
    assert spec.request_id == obj.get("id", 3)
    assert spec.prompt_token_ids == obj["prompt_token_ids"]
    for k in ("max_tokens", "temperature", "seed"):
        if k in obj:
            assert getattr(spec.params, k) == obj[k]
