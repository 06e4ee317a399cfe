"""Views of a config for people: the key table of ``posttrain <command> --help`` (with a preset's
values), the keys that differ from a command's defaults, and the resolved YAML of ``--print-config``."""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Literal

from posttrain.config import _hints, public_name


def describe(cls, prefix: str = "", instance: Any = None) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, help, source) for every leaf field, for ``posttrain <cmd> --help``.
    Defaults come from the command's own default instance (a section may override class defaults)."""
    instance = cls() if instance is None else instance
    rows = []
    hints = _hints(cls)
    for f in fields(cls):
        tp, value = hints[f.name], getattr(instance, f.name)
        if is_dataclass(tp):
            rows += describe(tp, prefix + public_name(f.name) + ".", value)
            continue
        rows.append((prefix + public_name(f.name), type_name(tp), repr(value), f.metadata.get("help", ""),
                     f.metadata.get("source", "")))
    return rows


def type_name(tp: Any) -> str:
    """'str', 'int | None', or the choices of a Literal: 'one of grpo | dr_grpo | ...'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def changed_keys(cfg: Any, defaults: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value, default)} for every leaf of ``cfg`` that differs from ``defaults``."""
    out = {}
    for f in fields(cfg):
        v, d = getattr(cfg, f.name), getattr(defaults, f.name)
        if is_dataclass(v):
            out.update(changed_keys(v, d, prefix + public_name(f.name) + "."))
        elif v != d:
            out[prefix + public_name(f.name)] = (v, d)
    return out


def resolved_yaml(cfg: Any, command: str | None = None) -> str:
    """The fully resolved config as YAML; a leaf that differs from the command's default carries
    ``# default: X``."""
    import yaml

    changed = changed_keys(cfg, type(cfg)())
    lines = [f"command: {command}"] if command else []

    def walk(node: Any, prefix: str, indent: str) -> None:
        for f in fields(node):
            v = getattr(node, f.name)
            key = prefix + public_name(f.name)
            if is_dataclass(v):
                lines.append(f"{indent}{public_name(f.name)}:")
                walk(v, key + ".", indent + "  ")
                continue
            text = yaml.safe_dump({public_name(f.name): v}, default_flow_style=True, width=10**6).strip()
            text = text[1:-1] if text.startswith("{") else text
            note = f"  # default: {changed[key][1]!r}" if key in changed else ""
            lines.append(f"{indent}{text}{note}")

    walk(cfg, "", "")
    return "\n".join(lines) + "\n"
