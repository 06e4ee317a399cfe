"""Reading config text: YAML presets and dotted ``key=value`` overrides (YAML scalars; "1e-5" is a
number even where YAML 1.1 reads a string)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=1e-5`` -> ("train.lr", 1e-5). Values are parsed as YAML scalars/lists."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value", where="command line",
                          fix="write e.g. train.lr=1e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_float(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return key.strip(), value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return any(c in s for c in "eE.") and s.strip().lower() not in ("nan", "inf", "-inf")
    except ValueError:
        return False


def _fix_floats(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _fix_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_floats(v) for v in tree]
    if isinstance(tree, str) and _looks_float(tree):
        return float(tree)
    return tree


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist", where=str(p),
                          fix="check the path; presets live in recipes/")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file is not valid YAML: {e}", where=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping of keys", where=str(p))
    return _fix_floats(data)
