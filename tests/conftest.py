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
def tokenizer(tiny_path):
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture()
def tiny_model(tiny_path):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(name_or_path=tiny_path))
