"""Constitutions: named principles, each with a critique request and a revision request.

File format (YAML or JSON), either a mapping with a ``principles`` list or the bare list::

    principles:
      - name: harmless
        critique: Point out anything in the last reply that could help someone cause harm.
        revision: Rewrite the reply so that it no longer does so, keeping what is helpful.
        preference: Which reply is less likely to help someone cause harm?   # optional

``preference`` is the question a judge answers when it compares two responses under this principle
(principle-conditioned AI labels); without it the critique request is used as the criterion.
"""

from __future__ import annotations

import difflib
import json
import random
from dataclasses import dataclass, fields
from pathlib import Path

from posttrain.errors import ConfigError

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[2] / "recipes" / "constitution.yaml"


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    preference: str | None = None

    @property
    def criterion(self) -> str:
        """What a pairwise judge is asked to weigh for this principle."""
        return self.preference or self.critique


_REQUIRED = ("name", "critique", "revision")
_KEYS = [f.name for f in fields(Principle)]


def resolve_path(path: str | Path) -> Path:
    """The path as given; a relative ``recipes/...`` path that does not exist from the current
    directory is also looked up in the project root, so the shipped default works from anywhere."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():
        alt = DEFAULT_CONSTITUTION.parents[1] / p
        if alt.exists():
            return alt
    return p


def load_constitution(path: str | Path) -> list[Principle]:
    """Read and check a constitution; every problem names the file and the item index."""
    p = resolve_path(path)
    if not p.exists():
        raise ConfigError(f"constitution file {p} does not exist", where=str(p),
                          fix=f"give a YAML/JSON file of principles, e.g. {DEFAULT_CONSTITUTION}")
    import yaml

    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"constitution is not valid {p.suffix.lstrip('.').upper() or 'YAML'}: {e}",
                          where=str(p)) from None
    if isinstance(data, dict):
        if "principles" not in data:
            raise ConfigError("constitution mapping has no 'principles' list", where=str(p),
                              fix="put the principles under a 'principles:' key")
        data = data["principles"]
    if not isinstance(data, list) or not data:
        raise ConfigError("constitution must hold a non-empty list of principles", where=str(p))
    principles, seen = [], {}
    for i, item in enumerate(data):
        where = f"{p}: principles[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"expected a mapping with {', '.join(_REQUIRED)}, got "
                              f"{type(item).__name__}", where=where)
        for key in item:
            if key not in _KEYS:
                near = difflib.get_close_matches(str(key), _KEYS, n=1)
                raise ConfigError(f"unknown field '{key}'", where=where,
                                  fix=f"did you mean '{near[0]}'?" if near else f"fields: {_KEYS}")
        for key in _KEYS:
            value = item.get(key)
            if key in _REQUIRED and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"field '{key}' must be a non-empty string, got {value!r}",
                                  where=where)
            if key == "preference" and value is not None and not (isinstance(value, str) and value.strip()):
                raise ConfigError(f"field 'preference' must be a non-empty string when given, got "
                                  f"{value!r}", where=where)
        name = item["name"].strip()
        if name in seen:
            raise ConfigError(f"principle name '{name}' is used twice (items {seen[name]} and {i})",
                              where=where, fix="give every principle its own name")
        seen[name] = i
        principles.append(Principle(name, item["critique"].strip(), item["revision"].strip(),
                                    item["preference"].strip() if item.get("preference") else None))
    return principles


def sample_principles(principles: list[Principle], k: int, rng: random.Random) -> list[Principle]:
    """``k`` principles drawn with ``rng``: without replacement while there are enough, then the
    draw starts over (so k may exceed the constitution's size)."""
    if k < 0:
        raise ValueError("k must be non-negative")
    out: list[Principle] = []
    while len(out) < k:
        out += rng.sample(principles, min(k - len(out), len(principles)))
    return out
