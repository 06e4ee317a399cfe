"""``posttrain recipes``: the presets in recipes/, one line each (file, command, what it is)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain.config import opt
from posttrain.errors import ConfigError


def default_dir() -> Path:
    """recipes/ beside the package (a source checkout), else in the current directory."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    return here if here.is_dir() else Path("recipes")


@dataclass
class RecipesConfig:
    dir: str | None = opt(None, "Folder of presets (null = the project's recipes/).")


def describe_recipe(path: Path) -> tuple[str, str, str]:
    """(file, command, first comment line) of a preset."""
    text = path.read_text()
    comment = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    command = (yaml.safe_load(text) or {}).get("command", "?")
    return path.name, str(command), comment


def run(cfg: RecipesConfig) -> dict:
    folder = Path(cfg.dir) if cfg.dir else default_dir()
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise ConfigError(f"no presets (*.yaml) in {folder}", where="dir", fix="give dir=<folder of presets>")
    rows = [describe_recipe(p) for p in files]
    width = max(len(f) for f, _, _ in rows)
    for f, command, comment in rows:
        print(f"{f:<{width}}  {command:<12} {comment}")
    print(f"\nrun one with: posttrain <command> --config {folder}/<file> [key=value ...]  (--print-config to see it)")
    return {"recipes": [f for f, _, _ in rows]}
