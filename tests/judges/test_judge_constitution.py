"""Constitution files: the shipped default, errors naming file and item, seeded sampling; config checks."""

import json
import random

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.judges.backends import parse_spec
from posttrain.judges.commands import CAIConfig, JudgeConfig
from posttrain.judges.constitution import (DEFAULT_CONSTITUTION, load_constitution, resolve_path,
                                           sample_principles)


def test_default_constitution_loads():
    principles = load_constitution(DEFAULT_CONSTITUTION)
    assert 6 <= len(principles) <= 10
    assert len({p.name for p in principles}) == len(principles)
    assert all(p.critique and p.revision and p.criterion for p in principles)
    assert resolve_path("recipes/constitution.yaml").exists()  # works from any directory


def _yaml(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = "  - {name: a, critique: find faults, revision: fix them}\n"


@pytest.mark.parametrize("body, match", [
    ("principles: []\n", "non-empty list"),
    ("rules: [1]\n", "no 'principles' list"),
    ("principles:\n" + GOOD + "  - just a string\n", r"principles\[1\].*expected a mapping"),
    ("principles:\n" + GOOD + "  - {name: b, critique: x}\n", r"principles\[1\].*'revision' must be"),
    ("principles:\n  - {name: a, critque: x, revision: y}\n", r"principles\[0\].*did you mean 'critique'"),
    ("principles:\n" + GOOD + "  - {name: a, critique: x, revision: y}\n", r"principles\[1\].*used twice"),
    ("principles:\n  - {name: a, critique: '', revision: y}\n", r"principles\[0\].*'critique'"),
    ("principles:\n  - {name: a, critique: x, revision: y, preference: 3}\n", r"\[0\].*'preference'"),
    ("principles: [unclosed\n", "not valid YAML"),
])
def test_malformed_constitutions_name_file_and_item(tmp_path, body, match):
    path = _yaml(tmp_path, body)
    with pytest.raises(ConfigError, match=match) as err:
        load_constitution(path)
    assert str(path) in str(err.value)


def test_missing_file_and_json_form(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_constitution(tmp_path / "nope.yaml")
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"name": "x", "critique": "c", "revision": "r", "preference": "p?"}]))
    (p,) = load_constitution(path)
    assert p.criterion == "p?"
    path.write_text("[{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_constitution(path)


def test_sampling_is_seeded_and_without_replacement():
    principles = load_constitution(DEFAULT_CONSTITUTION)
    a = sample_principles(principles, 4, random.Random(3))
    b = sample_principles(principles, 4, random.Random(3))
    assert a == b and len({p.name for p in a}) == 4
    many = sample_principles(principles, len(principles) + 2, random.Random(0))
    assert len(many) == len(principles) + 2
    assert {p.name for p in many[:len(principles)]} == {p.name for p in principles}
    assert sample_principles(principles, 0, random.Random(0)) == []


def test_backend_specs():
    assert parse_spec("hf:tiny") == ("hf", "tiny", None)
    assert parse_spec("openai:http://127.0.0.1:8000/v1#tiny") == ("openai", "http://127.0.0.1:8000/v1", "tiny")
    for bad in ("tiny", "hf:", "openai:http://x/v1", "openai:ftp://x#m", "vllm:x"):
        with pytest.raises(ConfigError, match="not understood"):
            parse_spec(bad)


def test_configs_reject_bad_values_before_loading_models(tmp_path):
    with pytest.raises(ConfigError, match="judge"):
        load_config(JudgeConfig, None, ["judge=gpt4"])
    with pytest.raises(ConfigError, match="pairwise judging only"):
        load_config(JudgeConfig, None, ["mode=grade", "logprobs=true"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CAIConfig, None, [f"constitution={tmp_path / 'none.yaml'}"])
    with pytest.raises(ConfigError, match="rounds"):
        load_config(CAIConfig, None, ["rounds=0"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(CAIConfig, None, ["round=2"])
    assert load_config(CAIConfig, None, ["backend.concurrency=2"]).backend.concurrency == 2


def test_hf_backend_choice_logprobs_are_teacher_forced_sums():
    """HFBackend.choice_logprobs: log p(choice | prompt) summed over the choice's tokens, the same number a
    separate teacher-forced forward gives (the calibrated-judge path; it ran no model in any test before)."""
    import math

    import torch

    from posttrain.judges.backends import HFBackend, supports_choice_logprobs

    backend = HFBackend("tiny")
    assert supports_choice_logprobs(backend)
    messages = [{"role": "user", "content": "Which is better, A or B?"}]
    out = backend.choice_logprobs(messages, ["A", "B"])
    assert set(out) == {"A", "B"} and all(math.isfinite(v) and v < 0 for v in out.values())
    tok, model = backend.tokenizer, backend.model
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for choice, value in out.items():
        c = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + c])).logits[0].float()
        lp = torch.log_softmax(logits[len(ids) - 1:-1], -1).gather(1, torch.tensor(c)[:, None]).sum()
        assert value == pytest.approx(float(lp), abs=1e-4)
