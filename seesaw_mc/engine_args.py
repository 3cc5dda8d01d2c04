"""The batch job's engine and sampling flags, generated from EngineConfig and SamplingParams
(like vLLM's EngineArgs): names, types, defaults and help come from the dataclasses and their
attribute docstrings, so each is written once.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from seesaw_mc.config import CacheConfig, EngineConfig, Layout, SchedulerConfig
from seesaw_mc.errors import SeesawError
from seesaw_mc.sampling_params import SamplingParams

# Options of the config with no flag of the batch job (they had none before the flags were
# generated); adding one is a change of behaviour, for its own issue.
_NO_FLAG = {"tokenizer", "gpu_memory_utilization"}
# The batch job serves greedy by default and leaves room for an answer (vLLM's SamplingParams,
# and ours, default to temperature 1.0 and 16 tokens).
_SAMPLING_DEFAULTS = {"max_tokens": 256, "temperature": 0.0}
_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "ignore_eos")


@dataclass(frozen=True)
class _Flag:
    """One command-line flag and the engine option (EngineConfig.from_kwargs name) it sets."""

    flag: str
    option: str
    type: Callable
    default: Any
    help: str
    metavar: Optional[str] = None
    to_option: Callable = lambda value: value
    action: Optional[str] = None
    """store_true / store_false for a bool option (the flag turns its default around)."""

    @property
    def dest(self) -> str:
        return self.option if self.action else self.flag[2:].replace("-", "_")


def _gib_to_bytes(gib: Optional[float]) -> Optional[int]:
    return int(gib * 2**30) if gib else None


# Flags that differ from their field: another name, or another unit.
_OVERRIDES = {
    "collective_timeout_s": {"flag": "--collective-timeout"},
    "device_capacity_bytes": {
        "flag": "--emulate-device-gib", "type": float, "to_option": _gib_to_bytes,
        "help": "CPU test beds: act as if each rank were a device of this many GiB (weights + KV); layouts whose "
                "weight shard does not fit are refused, like an out-of-memory GPU"},
    "enable_prefix_caching": {"flag": "--no-prefix-caching",
                              "help": "turn off prefix sharing: every prompt is computed and stored whole"},
    # The CLI's decode layout follows the prefill layout; the API's is tp1 (see engine_kwargs).
    "prefill_layout": {"help_suffix": " (default tp1pp1)"},
    "decode_layout": {"help_suffix": " (default: the prefill layout)"},
}


def attribute_docs(cls) -> Dict[str, str]:
    """A class's attribute docstrings (the string literal under each annotated field)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, doc in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            docs[field.target.id] = " ".join(doc.value.value.split())
    return docs


def _value_type(hint):
    """Optional[X] -> X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _flag_for(field: dataclasses.Field, option: str, hint, doc: str) -> _Flag:
    kind = _value_type(hint)
    over = dict(_OVERRIDES.get(field.name, {}))
    metavar, default = None, field.default
    if kind is bool:  # a switch that turns the default around: --no-x for a default of True
        flag = over.pop("flag", ("--no-" if default else "--") + option.replace("_", "-"))
        return _Flag(flag=flag, option=option, type=bool, default=default, help=over.pop("help", doc),
                     action="store_false" if default else "store_true")
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        # Plain str, not argparse choices: a bad value gets the config's own one-line error.
        metavar, kind = "{" + ",".join(m.value for m in kind) + "}", str
    elif kind is Layout:
        kind, default = str, None  # resolved together with --layouts (see layouts())
    elif kind not in (int, float, str):
        raise TypeError(f"EngineConfig.{field.name}: no command-line flag for type {kind!r}")
    if default is dataclasses.MISSING:  # the model: a required flag
        default = None
    return _Flag(flag=over.pop("flag", "--" + option.replace("_", "-")), option=option, type=over.pop("type", kind),
                 default=default, help=over.pop("help", doc) + over.pop("help_suffix", ""), metavar=metavar, **over)


def engine_flags() -> List[_Flag]:
    """Every engine flag: EngineConfig's fields, then its sections' fields under their flat
    option names (EngineConfig.ALIASES), in declaration order."""
    flags = []
    for cls, section in ((EngineConfig, None), (CacheConfig, "cache"), (SchedulerConfig, "scheduler")):
        hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("cache", "scheduler"):
                continue
            option = f.name
            if section:  # a section's field is an engine option only through a flat alias
                names = [k for k, v in EngineConfig.ALIASES.items() if v == (section, f.name)]
                if not names:
                    continue
                option = f.name if f.name in names else names[0]
            if option not in _NO_FLAG:
                flags.append(_flag_for(f, option, hints[f.name], docs.get(f.name, "")))
    return flags


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default after its help, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.required or action.nargs == 0 or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def add_engine_args(p: argparse.ArgumentParser):
    """The engine flags, in a group of their own (returned)."""
    g = p.add_argument_group("engine")
    for f in engine_flags():
        if f.action:
            g.add_argument(f.flag, dest=f.dest, action=f.action, default=f.default, help=f.help.replace("%", "%%"))
            continue
        g.add_argument(f.flag, type=f.type, default=f.default, required=f.option == "model",
                       metavar=f.metavar, help=f.help.replace("%", "%%"))
    g.add_argument("--layouts", default=None, help="paper notation: P4->T4, D2P4->D2T4, one static layout, or "
                   "auto (generate: the planner's best for this input and the launched ranks)")
    return g


def layouts(a: argparse.Namespace) -> Dict[str, Layout]:
    if a.layouts and (a.prefill_layout or a.decode_layout):
        raise SeesawError("give either --layouts or --prefill-layout/--decode-layout, not both")
    if a.layouts:
        pre, dec = Layout.parse_pair(a.layouts)
    else:
        pre = Layout.parse(a.prefill_layout or a.decode_layout or "tp1")
        dec = Layout.parse(a.decode_layout) if a.decode_layout else pre
    return {"prefill_layout": pre, "decode_layout": dec}


def engine_kwargs(a: argparse.Namespace) -> Dict[str, Any]:
    """The parsed engine flags as EngineConfig.from_kwargs options (the model aside)."""
    kw = {f.option: f.to_option(getattr(a, f.dest)) for f in engine_flags()
          if f.option != "model" and not f.option.endswith("_layout")}
    return dict(kw, **layouts(a))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling defaults (an input line's own fields win)")
    hints, docs = typing.get_type_hints(SamplingParams), attribute_docs(SamplingParams)
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    for name in _SAMPLING_FLAGS:
        flag, kind = "--" + name.replace("_", "-"), _value_type(hints[name])
        if kind is bool:
            g.add_argument(flag, action="store_true", help=docs[name])
        else:
            g.add_argument(flag, type=kind, default=_SAMPLING_DEFAULTS.get(name, fields[name].default),
                           help=docs[name].replace("%", "%%"))


def sampling_defaults(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{name: getattr(a, name) for name in _SAMPLING_FLAGS})
