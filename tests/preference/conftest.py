"""Fixtures of the preference tests: an SFT starting point trained once per session, and held-out
gold-labeled pairs the training data never contains."""

import json

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
def sft_dir(tmp_path_factory):
    """A short SFT run on the built-in task: the policy DPO/IPO/KTO start from (final/ dir)."""
    from posttrain.algorithms.sft import SFTConfig, run
    from posttrain.config import load_config

    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(SFTConfig, None, [f"train.output_dir={out}", "train.progress=false", "data.eval=null",
                                        "task_eval=false", "train.max_steps=300", "train.log_every=50"])
    run(cfg)
    return out / "final"
