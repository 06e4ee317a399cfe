"""The preference recipes load and validate with their commands' config classes (tests/test_recipes.py
covers them too once the commands are registered in the CLI)."""

from pathlib import Path

import pytest

from posttrain.algorithms.dpo import DPOConfig
from posttrain.algorithms.kto import KTOConfig
from posttrain.algorithms.reward import RewardConfig
from posttrain.config import load_config, read_yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CLASSES = {"reward": RewardConfig, "dpo": DPOConfig, "kto": KTOConfig}


@pytest.mark.parametrize("name", ["reward", "dpo", "ipo", "kto", "simpo", "orpo"])
def test_recipe_loads(name):
    path = RECIPES / f"{name}.yaml"
    command = read_yaml(path)["command"]
    cfg = load_config(CLASSES[command], path)
    if command == "dpo":
        assert cfg.loss == ("dpo" if name == "dpo" else name)
