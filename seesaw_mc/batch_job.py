"""`seesaw-mc generate`: a JSONL batch job from input file to output file.

Read and check every line, tokenize and check every prompt against the model (both before
the weights load), pick layouts for this input (--layouts auto), build the engine, set aside
the requests the KV tiers can never hold, resume from what the output already holds, then
serve the rest through the replica driver, appending one line per request as it finishes
(one file per DP replica, merged in input order at the end: batch_output.py).
The engine and torch load only once the input has passed its cheap checks, so a bad file is
refused in a second.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List

from seesaw_mc.auto_layouts import auto_layouts
from seesaw_mc.batch_output import AppendWriter, line_key, merge, part_path, request_key, start_output
from seesaw_mc.driver import drive, global_rank, on_rank0
from seesaw_mc.engine_args import engine_kwargs, sampling_defaults
from seesaw_mc.errors import CapacityError, SeesawError
from seesaw_mc.inputs import InvalidLine, RequestSpec, error_record, output_record, raise_invalid, read_requests


def run(a) -> int:
    # All bad lines of the input are listed together, once the prompts are checked against the model too.
    specs, invalid = read_requests(a.input, sampling_defaults(a), skip_invalid=True)
    total = len(specs) + len(invalid)
    out_dir = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(out_dir):
        raise SeesawError(f"output folder {out_dir!r} does not exist")
    t0 = time.perf_counter()
    ok = _check_prompts(a, specs, invalid)
    if invalid and not a.skip_invalid:
        raise_invalid(sorted(invalid, key=lambda b: b.line), total)
    if (a.layouts or "").strip().lower() == "auto":
        if a.prefill_layout or a.decode_layout:
            raise SeesawError("give either --layouts or --prefill-layout/--decode-layout, not both")
        a.layouts = auto_layouts(a, ok)
    from seesaw_mc.config import EngineConfig
    from seesaw_mc.engine import LLMEngine

    eng = LLMEngine(EngineConfig.from_kwargs(a.model, **engine_kwargs(a)))
    unserved = [(b, "invalid_request") for b in invalid]  # -> an error record each
    specs = _admit(eng, ok, unserved)
    # Resume: rank 0 merges what the output and its part files already hold and every rank skips
    # those requests (the same list everywhere: DP replicas take the rest by index). Without
    # --resume the output starts empty. `order` puts the finished file in input order.
    order = {request_key(s.request_id): s.line for s in ok}
    order.update((line_key(b.line), b.line) for b, _ in unserved)
    done, torn = on_rank0(lambda: _open_output(a, order), (set(), 0))
    todo = [s for s in specs if request_key(s.request_id) not in done]
    if global_rank() == 0:
        if a.resume:
            n_done = len(specs) - len(todo) + sum(line_key(b.line) in done for b, _ in unserved)
            dropped = f" ({torn} torn line(s) dropped: their requests run again)" if torn else ""
            print(f"resume: {n_done} of {total} requests already in {a.output}{dropped}", file=sys.stderr)
        _write_unserved(a.output, unserved, done)
    return _serve(a, eng, todo, order, t0)


def _check_prompts(a, specs: List[RequestSpec], invalid: List[InvalidLine]) -> List[RequestSpec]:
    """Tokenize and check every prompt against the model's config before loading its weights,
    so that the whole input is refused (or its bad lines set aside) up front. Bad prompts join
    `invalid`; returns the good requests."""
    from seesaw_mc.preflight import check_prompt, context_limit, load_tokenizer
    from seesaw_mc.model_spec import load_model_args

    args = load_model_args(a.model)
    context = context_limit(args, a.max_model_len)
    tok = load_tokenizer(a.model)
    ok = []
    for spec in specs:
        try:
            if spec.messages is not None:
                ids = _chat_ids(tok, spec.messages)
            elif spec.prompt is not None:
                ids = tok.encode(spec.prompt)
            else:
                ids = spec.prompt_token_ids
            spec.prompt_token_ids = check_prompt(spec.request_id, ids, args.vocab_size, context)
            ok.append(spec)
        except SeesawError as e:  # messages are about the request; InvalidLine adds the line
            invalid.append(InvalidLine(spec.line, str(e), spec.request_id, spec.openai is not None))
    return ok


def _chat_ids(tok, messages):
    if not getattr(tok, "chat_template", None):
        raise SeesawError("'messages' given but the tokenizer has no chat template")
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _admit(eng, ok: List[RequestSpec], unserved: list) -> List[RequestSpec]:
    """The requests the engine can serve; a valid one that the KV tiers can never hold fails
    alone (joins `unserved`), not the job."""
    admitted = []
    for spec in ok:
        try:
            eng.validate_prompt(spec.request_id, spec.prompt_token_ids)
        except CapacityError as e:
            unserved.append((InvalidLine(spec.line, str(e), spec.request_id, spec.openai is not None), "capacity"))
            continue
        admitted.append(spec)
    return admitted


def _open_output(a, order: dict):
    """Rank 0: (keys of the requests already in the output, torn lines dropped) with --resume,
    else an empty output."""
    try:
        return start_output(a.output, a.resume, order)
    except OSError as e:
        raise SeesawError(f"cannot write {a.output}: {e.strerror}") from None


def _write_unserved(output: str, unserved: list, done: set) -> None:
    """One line per input line: the requests not served get an error record."""
    errors = AppendWriter(output, truncate=False)
    try:
        for bad, code in sorted(unserved, key=lambda x: x[0].line):
            if line_key(bad.line) not in done:
                errors.write(error_record(bad, code))
    finally:
        errors.close()
    if unserved:
        print(f"{len(unserved)} request(s) not served (error records in {output}): "
              f"{unserved[0][1]}: line {unserved[0][0].line}: {unserved[0][0].message}", file=sys.stderr)


def _serve(a, eng, todo: List[RequestSpec], order: dict, t0: float) -> int:
    by_id = {s.request_id: s for s in todo}
    model_name = os.path.basename(os.path.normpath(a.model))
    t_load = time.perf_counter() - t0
    counts = {"requests": 0, "prompt": 0, "completion": 0}

    def write(res):
        out.write(output_record(by_id[res.request_id], res, model_name))
        counts["requests"] += 1
        counts["prompt"] += res.usage["prompt_tokens"]
        counts["completion"] += res.usage["completion_tokens"]

    def finish():  # before this replica reports done: rank 0 reads its file next
        out.close()
        m = eng.metrics()  # summed over the replicas below
        counts.update(m["prefix_cache"], prefill_tokens=m["engine"]["prefill_tokens"])
        return counts

    t1 = time.perf_counter()
    # One writer per file (batch_output.py): replica 0 appends to the output, the others to parts.
    out = AppendWriter(part_path(a.output, eng.dp_rank), truncate=eng.dp_rank > 0) if eng.is_leader else None
    try:
        parts = drive(eng, todo, write, use_tqdm=not a.no_tqdm and sys.stderr.isatty(), result=finish)
    finally:
        if out is not None:
            out.close()
    on_rank0(lambda: _merge_parts(a.output, eng.dp_size, order, [c["requests"] for c in parts]))
    if not eng.is_leader or eng.dp_rank != 0:  # the first replica's leader reports for the job
        return 0
    counts = {k: sum(c[k] for c in parts) for k in counts}
    _write_metrics(a, eng)
    el = time.perf_counter() - t1
    print(f"Throughput: {counts['requests'] / el:.2f} requests/s, {(counts['prompt'] + counts['completion']) / el:.2f} "
          f"total tokens/s, {counts['completion'] / el:.2f} output tokens/s "
          f"({counts['requests']} requests in {el:.1f} s; model load {t_load:.1f} s)", file=sys.stderr)
    if counts.get("prefill_tokens_saved"):
        rates = ", ".join(f"{t} {counts[f'{t}_hit_blocks'] / counts[f'{t}_queried_blocks']:.0%}"
                          for t in ("device", "host") if counts[f"{t}_queried_blocks"])
        saved = counts["prefill_tokens_saved"]  # recomputes after preemption count in both
        print(f"Prefix cache: {saved} prompt tokens not computed, {saved / (saved + counts['prefill_tokens']):.0%} "
              f"of the prefills'; block hit rate {rates}", file=sys.stderr)
    return 0


def _merge_parts(output: str, dp_size: int, order: dict, lines: List[int]) -> None:
    """Rank 0, once every replica is done: the parts into the output, in input order."""
    try:
        merge(output, [part_path(output, r) for r in range(1, dp_size)], order, expect=lines[1:])
    except OSError as e:
        raise SeesawError(f"cannot merge the replicas' lines into {output}: {e.strerror}") from None


def _write_metrics(a, eng) -> None:
    if not (a.timeline or a.metrics_json):
        return
    m = eng.metrics()
    if a.timeline:
        from seesaw_mc.timeline import plot_timeline

        plot_timeline(a.timeline, m["timeline"], m["transitions"], title=f"{eng.config.prefill_layout} -> "
                      f"{eng.config.decode_layout}: {len(m['transitions'])} transitions")
    if a.metrics_json:
        with open(a.metrics_json, "w") as f:
            json.dump(m, f, indent=2)
