"""gpu_check.json -> a Markdown table: one line per check, its verdict and its key figures
(what the issue's closing note and benchmarks/results/gpu_h200.md show)."""
from __future__ import annotations


def _f(x) -> str:
    """Three significant figures or so, never scientific notation above 0.01."""
    if not isinstance(x, float):
        return "-" if x is None else str(x)
    a = abs(x)
    return f"{x:.0f}" if a >= 100 else f"{x:.2f}" if a >= 1 else f"{x:.3f}" if a >= 1e-2 else f"{x:.2g}"


def _token_exact(r: dict) -> str:
    parts = [] if "tf32_matmul" not in r else [f"TF32 matmuls: {r['tf32_matmul']}"]
    for name, e in r.items():
        if not isinstance(e, dict):
            continue
        if "skipped" in e or "error" in e or "bfloat16" not in e:
            parts.append(f"{name}: {e.get('skipped') or e.get('error') or 'stopped at ' + e.get('at', '?')}")
            continue
        verdict = "/".join("=" if e.get(dt, {}).get("equal") else "≠" for dt in ("float32", "bfloat16"))
        div = e.get("bf16_vs_fp32_ours")
        parts.append(f"{name} fp32/bf16 {verdict} HF" + (f", bf16 leaves fp32 at token {div['token']}" if div else ""))
    return "; ".join(parts)


def _attention(r: dict) -> str:
    return "; ".join(f"{dt}: max abs diff: decode {_f(e.get('decode_max_abs_diff'))}, prefill "
                     f"{_f(e.get('prefill_max_abs_diff'))}; decode {_f(e.get('decode_us'))} µs vs padded SDPA "
                     f"{_f(e.get('padded_sdpa_us'))} µs" for dt, e in r.items())


def _host_tier(r: dict) -> str:
    rt, cr, wr = r.get("round_trip", {}), r.get("copy_rates", {}), r.get("weight_reload", {})
    plain = cr.get("plain", {})
    return (f"round trip tokens equal: {rt.get('tokens_equal')}; Stager offload {_f(cr.get('offload_GBps'))} GB/s, "
            f"prefetch {_f(cr.get('prefetch_GBps'))} GB/s vs pinned D2H {_f(plain.get('d2h_pinned_GBps'))} / H2D "
            f"{_f(plain.get('h2d_pinned_GBps'))} GB/s; weight reload {_f(wr.get('GBps'))} GB/s (master pinned: "
            f"{wr.get('master_pinned')}), tokens equal: {wr.get('tokens_equal')}")


def _roofline(r: dict) -> str:
    rows = r.get("batches", {})
    cells = [f"b{b}: {_f(e['step_ms'])} ms = {_f(e['x_floor'])}x floor" for b, e in rows.items()]
    return f"copy {_f(r.get('copy_bandwidth_GBps'))} GB/s; " + ", ".join(cells) + f"; goal met: {r.get('goal_met')}"


def _prefill(r: dict) -> str:
    return (f"{_f(r.get('TFLOPs'))} TFLOP/s = {_f(r.get('share_of_matmul'))} of the matmul rate "
            f"{_f(r.get('matmul_TFLOPs'))}; {_f(r.get('tokens_per_s'))} tok/s")


def _throughput(r: dict) -> str:
    s, h = r.get("seesaw", {}), r.get("hf", {})
    return (f"seesaw {_f(s.get('output_tokens_per_second'))} vs HF {_f(h.get('output_tokens_per_second'))} "
            f"output tok/s: {_f(r.get('ratio_vs_hf'))}x (total tokens/s)")


def _kernels(r: dict) -> str:
    if "auto" not in r:
        return r.get("error", "-")
    out = [f"auto -> {r['auto']['chosen']}"]
    for name in ("deepspeed", "apex"):
        e = r.get(name, {})
        if e.get("chosen") == name:
            out.append(f"{name} loads ({_f(e.get('select_s'))} s), max abs diff {_f(e.get('max_abs_diff_vs_torch'))}, "
                       f"{_f(e.get('us'))} µs vs torch {_f(r.get('torch_us'))} µs")
        else:
            out.append(f"{name}: {e.get('skipped', {}).get(name, '-')}")
    return "; ".join(out)


FIGURES = {"token_exact": _token_exact, "attention": _attention, "host_tier": _host_tier,
           "decode_roofline": _roofline, "prefill": _prefill, "throughput": _throughput, "kernels": _kernels}


def markdown(doc: dict) -> str:
    dev = doc.get("device", {})
    head = (f"{doc.get('mode')} on {dev.get('name', dev.get('device'))}; torch {doc.get('versions', {}).get('torch')}, "
            f"elapsed {doc.get('elapsed_s', '-')} s, ok: {doc.get('ok')}")
    lines = [head, "", "| check | status | s | figures |", "|---|---|---|---|"]
    for name, rec in doc["checks"].items():
        try:
            figs = FIGURES[name](rec.get("result", {})) if rec.get("result") else ""
        except (KeyError, TypeError, ValueError) as e:  # a partial result: say so, never fail the table
            figs = f"(partial: {e.__class__.__name__})"
        if rec.get("error"):
            figs = (figs + "; " if figs else "") + rec["error"]
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '-')} | {figs.replace('|', '/')} |")
    return "\n".join(lines)
