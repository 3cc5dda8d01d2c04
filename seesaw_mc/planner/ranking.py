"""Rank every static layout and (prefill, decode) pair of a world size, best first, for
`seesaw-mc plan` (which prints the ranking) and `seesaw-mc generate --layouts auto` (which runs
the top entry)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from seesaw_mc.config import Layout
from seesaw_mc.errors import ConfigError
from seesaw_mc.model_spec import ModelShape
from seesaw_mc.planner.cost_model import CostModel, Estimate, paper_name
from seesaw_mc.planner.hardware import Hardware
from seesaw_mc.planner.models import resolve_model
from seesaw_mc.planner.workload import Workload


def candidate_layouts(world: int, model: ModelShape) -> List[Layout]:
    """Every dp x tp x pp = world that the engine can run for this model."""
    out = []
    for dp in range(1, world + 1):
        for tp in range(1, world // dp + 1):
            if world % (dp * tp):
                continue
            pp = world // (dp * tp)
            if model.heads % tp or model.kv_heads % tp or pp > model.layers:
                continue
            out.append(Layout(tp=tp, pp=pp, dp=dp))
    return out


def plan(model: ModelShape, hw: Hardware, world: int, wl: Workload, pairs: bool = True,
         **cost_kw) -> List[Estimate]:
    """Every static layout and every (prefill, decode) pair with the same DP, best first."""
    cm = CostModel(model, hw, world, **cost_kw)
    lays = candidate_layouts(world, model)
    cands = [(a, a) for a in lays]
    if pairs:
        cands += [(a, b) for a in lays for b in lays if a != b and a.dp == b.dp]
    ests = [cm.estimate(a, b, wl) for a, b in cands]
    return sorted(ests, key=lambda e: (not e.fits, -e.tokens_per_s, e.label))


def format_plan(ests: Sequence[Estimate], model: ModelShape, hw: Hardware, world: int, wl: Workload,
                block_size: int = 16, top: int = 10) -> str:
    lines = [f"{model.name} ({model.params / 1e9:.2f}B params, {model.dtype_bytes} B/param) on {world} x {hw.name}; "
             f"workload {wl.name}: {wl.n} requests, mean input {wl.mean_in:.0f}, mean output {wl.mean_out:.0f}",
             f"{'rank':>4}  {'layouts':<14}{'tokens/s':>12}{'prefill s':>11}{'decode s':>10}{'trans.':>7}"
             f"{'trans. s':>9}{'batch':>7}"]
    fit = [e for e in ests if e.fits]
    for i, e in enumerate(fit[:top]):
        lines.append(f"{i + 1:>4}  {e.label:<14}{e.tokens_per_s:>12,.0f}{e.prefill_s:>11.1f}{e.decode_s:>10.1f}"
                     f"{e.transitions:>7}{e.transition_s:>9.2f}{e.decode_batch:>7}")
    for e in (e for e in ests if not e.fits):
        lines.append(f"   -  {e.label:<14}does not fit: {e.why}")
    if fit:
        best = fit[0]
        kv = ", ".join(f"{paper_name(Layout.parse(k))}: {v // block_size:,} blocks of {block_size}"
                       for k, v in best.device_kv_tokens.items())
        lines.append(f"chosen: {best.label}; device KV tier per replica {kv}"
                     + (f"; host KV tier {best.host_kv_tokens // block_size:,} blocks" if best.host_kv_tokens else ""))
    return "\n".join(lines)


def auto_layouts(model_dir: str, world: int, wl: Workload, hw: Hardware, **cost_kw) -> Tuple[Layout, Layout, List[Estimate]]:
    """The best (prefill, decode) layouts for `world` ranks, for `generate --layouts auto`."""
    model = resolve_model(model_dir)
    ests = plan(model, hw, world, wl, **cost_kw)
    if not ests or not ests[0].fits:
        raise ConfigError(f"no layout of {world} ranks fits {model.name}: "
                          + (ests[0].why if ests else "the model's heads/layers allow none"))
    return ests[0].prefill, ests[0].decode, ests
