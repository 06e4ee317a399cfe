"""Every preset in recipes/ (recursively) loads and validates with its command's config class."""

from pathlib import Path

import pytest

from posttrain.commands import COMMANDS, load_command
from posttrain.config import load_config, read_yaml

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").rglob("*.yaml")
                 if read_yaml(p).get("command"))


def test_there_are_recipes():
    assert len(RECIPES) >= 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    command = read_yaml(path)["command"]
    assert command in COMMANDS, f"{path}: unknown command {command}"
    cls, _ = load_command(COMMANDS[command])
    load_config(cls, path)
