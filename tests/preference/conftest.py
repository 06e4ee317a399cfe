"""Fixtures of the preference tests: the SFT starting point (trained once and cached), and held-out
gold-labeled pairs the training data never contains."""

import json
from pathlib import Path

import pytest

from posttrain.tasks import builtin


@pytest.fixture(scope="session")
def heldout_pairs(tmp_path_factory):
    """200 held-out pairs labeled by the hidden gold reward (a seed the training split never uses)."""
    path = tmp_path_factory.mktemp("prefs") / "heldout.jsonl"
    rows = builtin.gold_preference_records(200, seed=101)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def sft_dir(sft_policy):
    """The policy DPO/IPO/KTO start from: tests/conftest.py's cached SFT model of the built-in task."""
    return Path(sft_policy)
