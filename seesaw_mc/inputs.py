"""Batch-job input (JSONL) parsing and output records (pure Python).

An input line is either
  - plain: {"prompt": str | [token ids]} or {"prompt_token_ids": [...]} or {"messages": [...]},
    optional "id", and sampling fields (max_tokens, temperature, ...) at the top level; or
  - an OpenAI batch request: {"custom_id": ..., "method": "POST", "url": "/v1/completions" or
    "/v1/chat/completions", "body": {"prompt" | "messages", "max_tokens", ...}}.
Every problem is reported with its 1-based line number; nothing is silently skipped.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from seesaw_mc.errors import ConfigError, InputError
from seesaw_mc.sampling_params import SamplingParams

SAMPLING_FIELDS = SamplingParams.field_names()
# OpenAI request fields with a direct meaning here.
_OPENAI_ALIASES = {"max_completion_tokens": "max_tokens"}
# OpenAI fields accepted and ignored because they do not change offline generation.
_OPENAI_IGNORED = {"model", "stream", "user", "echo", "frequency_penalty", "presence_penalty"}
_PLAIN_KEYS = {"id", "prompt", "prompt_token_ids", "messages"}
_OPENAI_TOP = {"custom_id", "method", "url", "body"}


@dataclass
class RequestSpec:
    line: int
    request_id: Any
    prompt: Optional[str] = None
    prompt_token_ids: Optional[List[int]] = None
    messages: Optional[List[dict]] = None
    params: Optional[SamplingParams] = None
    openai: Optional[str] = None
    """None for plain lines, else "completions" or "chat.completions"."""
    extra: Dict[str, Any] = field(default_factory=dict)


def _fail(lineno: int, msg: str):
    err = InputError(f"line {lineno}: {msg}")
    err.detail = msg  # the message without its line, for InvalidLine
    raise err


def _check_messages(lineno: int, messages) -> List[dict]:
    if not isinstance(messages, list) or not messages:
        _fail(lineno, "'messages' must be a non-empty list of {role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            _fail(lineno, "'messages' must be a non-empty list of {role, content} objects with string values")
    return messages


def _sampling(lineno: int, fields: Dict[str, Any], defaults: SamplingParams) -> SamplingParams:
    try:
        return defaults.clone(**fields)
    except ConfigError as e:
        _fail(lineno, str(e))
    except TypeError as e:
        _fail(lineno, f"bad sampling field ({e})")


def _prompt_fields(lineno: int, obj: dict, spec: RequestSpec) -> None:
    given = [k for k in ("prompt", "prompt_token_ids", "messages") if k in obj]
    if len(given) != 1:
        _fail(lineno, "needs exactly one of 'prompt', 'prompt_token_ids' or 'messages'")
    key = given[0]
    v = obj[key]
    if key == "messages":
        spec.messages = _check_messages(lineno, v)
    elif key == "prompt" and isinstance(v, str):
        if not v:
            _fail(lineno, "empty prompt")
        spec.prompt = v
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        spec.prompt_token_ids = v
    else:
        _fail(lineno, f"'{key}' must be a non-empty string or a non-empty list of token ids")


def parse_line(lineno: int, raw: bytes, defaults: SamplingParams) -> RequestSpec:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _fail(lineno, "not valid UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        _fail(lineno, f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        _fail(lineno, f"expected a JSON object, got {type(obj).__name__}")
    if "body" in obj or "custom_id" in obj:
        unknown = sorted(set(obj) - _OPENAI_TOP)
        if unknown:
            _fail(lineno, f"unknown field {unknown[0]!r} in an OpenAI batch request")
        if "custom_id" not in obj or not isinstance(obj.get("body"), dict):
            _fail(lineno, "an OpenAI batch request needs 'custom_id' and an object 'body'")
        url = obj.get("url", "/v1/completions")
        body = obj["body"]
        spec = RequestSpec(lineno, obj["custom_id"], openai="chat.completions" if "messages" in body else "completions")
        if url not in ("/v1/completions", "/v1/chat/completions"):
            _fail(lineno, f"unsupported url {url!r} (use /v1/completions or /v1/chat/completions)")
        _prompt_fields(lineno, body, spec)
        fields = {}
        for k, v in body.items():
            if k in ("prompt", "prompt_token_ids", "messages") or k in _OPENAI_IGNORED:
                continue
            if k == "logprobs" and isinstance(v, bool):  # chat API: logprobs=true + top_logprobs=N
                fields["logprobs"] = body.get("top_logprobs", 0) if v else None
                continue
            if k == "top_logprobs":
                continue
            k = _OPENAI_ALIASES.get(k, k)
            if k not in SAMPLING_FIELDS:
                _fail(lineno, f"unknown field {k!r} in 'body'")
            fields[k] = v
        spec.params = _sampling(lineno, fields, defaults)
        return spec
    unknown = sorted(set(obj) - _PLAIN_KEYS - SAMPLING_FIELDS)
    if unknown:
        _fail(lineno, f"unknown field {unknown[0]!r}")
    rid = obj.get("id", lineno)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        _fail(lineno, "'id' must be a string or an integer")
    spec = RequestSpec(lineno, rid)
    _prompt_fields(lineno, obj, spec)
    spec.params = _sampling(lineno, {k: v for k, v in obj.items() if k in SAMPLING_FIELDS}, defaults)
    return spec


@dataclass
class InvalidLine:
    line: int
    message: str
    request_id: Any = None
    openai: bool = False


def _peek_id(raw: bytes):
    """The id an invalid line meant to have, if it can be read (for its error record)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, False
    if not isinstance(obj, dict):
        return None, False
    if "custom_id" in obj or "body" in obj:
        return obj.get("custom_id"), True
    rid = obj.get("id")
    return (rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None), False


def read_requests(path: str, defaults: SamplingParams, skip_invalid: bool = False):
    """Parse a whole JSONL file -> (valid specs, invalid lines). Without skip_invalid any
    invalid line raises one InputError listing the first few, with line numbers."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except OSError as e:
        raise InputError(f"cannot read input file {path!r}: {e.strerror}") from None
    specs: List[RequestSpec] = []
    invalid: List[InvalidLine] = []
    seen: Dict[Any, int] = {}
    for i, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) carry no request
        try:
            spec = parse_line(i, raw, defaults)
            if spec.request_id in seen:
                _fail(i, f"duplicate id {spec.request_id!r} (first on line {seen[spec.request_id]})")
        except InputError as e:
            rid, openai = _peek_id(raw)
            invalid.append(InvalidLine(i, e.detail, rid, openai))
            continue
        seen[spec.request_id] = i
        specs.append(spec)
    if invalid and not skip_invalid:
        raise_invalid(invalid, len(specs) + len(invalid))
    if not specs and not invalid:
        raise InputError(f"input file {path!r} has no requests")
    return specs, invalid


def raise_invalid(invalid: List[InvalidLine], total: int, shown: int = 3):
    first = "; ".join(f"line {b.line}: {b.message}" for b in invalid[:shown])
    more = f" (and {len(invalid) - shown} more)" if len(invalid) > shown else ""
    if len(invalid) == 1:
        raise InputError(f"line {invalid[0].line}: {invalid[0].message}; fix it or pass --skip-invalid")
    raise InputError(f"{len(invalid)} of {total} input lines are invalid: {first}{more}; fix them or pass "
                     f"--skip-invalid to serve the valid ones and write an error record for each invalid one")


def error_record(bad: InvalidLine, code: str = "invalid_request") -> dict:
    """The output line of a request that was not served: plain or OpenAI batch format."""
    err = {"code": code, "message": f"line {bad.line}: {bad.message}", "line": bad.line}
    if bad.openai:
        return {"id": f"batch_req_{bad.line}", "custom_id": bad.request_id, "response": None, "error": err}
    return {"id": bad.request_id if bad.request_id is not None else bad.line, "error": err}


def output_record(spec: RequestSpec, out, model_name: str) -> dict:
    """One output line: ours for plain input, OpenAI batch output for OpenAI input."""
    usage = out.usage
    if spec.openai is None:
        first = out.outputs[0]
        rec = {"id": spec.request_id, "text": first.text, "token_ids": first.token_ids,
               "finish_reason": first.finish_reason, "usage": usage}
        if len(out.outputs) > 1:
            rec["outputs"] = [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                               "finish_reason": o.finish_reason} for o in out.outputs]
        return rec
    chat = spec.openai == "chat.completions"
    choices = []
    for o in out.outputs:
        c = {"index": o.index, "finish_reason": o.finish_reason, "logprobs": None}
        if chat:
            c["message"] = {"role": "assistant", "content": o.text}
        else:
            c["text"] = o.text
        choices.append(c)
    body = {"id": f"cmpl-{spec.request_id}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices, "usage": usage}
    return {"id": f"batch_req_{spec.line}", "custom_id": spec.request_id,
            "response": {"status_code": 200, "request_id": f"req_{spec.line}", "body": body}, "error": None}
