"""Shared fixtures. The tiny model is built once per machine into $POSTTRAIN_CACHE."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("POSTTRAIN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "posttrain"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_path():
    from posttrain.models.tiny import resolve

    return resolve("tiny")


@pytest.fixture(scope="session")
def sft_policy(tiny_path) -> str:
    """final/ of an SFT model of the built-in task (imitates the noisy demonstrator: accuracy ~0.6), the
    policy the RL, preference and serving tests start from, trained once and cached."""
    from posttrain.algorithms.sft import SFTConfig, run
    from pt_helpers import SFT_OVERRIDES, cached_run

    return str(cached_run("sft", SFTConfig, run, ["model.name_or_path=tiny", *SFT_OVERRIDES]) / "final")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture()
def tiny_model(tiny_path):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(name_or_path=tiny_path))
