"""model.dropout: off where a loss compares log-probs of the same tokens from two passes (dpo/kto, online RL,
distill), kept for sft and reward; lora.dropout follows it unless set, and a LoRA dropout asked for where
dropout is off is refused. Off means every dropout of the model, in training mode too."""

import pytest
import torch

from posttrain.commands import COMMANDS, load_command
from posttrain.config import LoraConfig, ModelConfig, load_config
from posttrain.errors import ConfigError
from posttrain.models.loading import load_causal_lm, load_policy

OFF = {"dpo", "kto", "grpo", "rloo", "reinforce", "ppo", "online-dpo", "distill"}
KEEP = {"sft", "reward"}
NEEDS = {"distill": ["teacher.name_or_path=tiny"]}  # what a command cannot start without


def _cls(name):
    return load_command(COMMANDS[name])[0]


@pytest.mark.parametrize("name", sorted(OFF | KEEP))
def test_auto_resolves_by_what_the_loss_compares(name):
    cfg = load_config(_cls(name), None, ["lora.enabled=true", *NEEDS.get(name, [])])
    want = "off" if name in OFF else "keep"
    assert (cfg.model.dropout, cfg.lora.dropout) == (want, 0.0 if want == "off" else 0.05)
    kept = load_config(_cls(name), None, ["lora.enabled=true", "model.dropout=keep", "lora.dropout=0.1",
                                          *NEEDS.get(name, [])])
    assert (kept.model.dropout, kept.lora.dropout) == ("keep", 0.1)  # what the user asks for is what runs


def test_a_lora_dropout_where_dropout_is_off_is_refused_naming_both_keys():
    with pytest.raises(ConfigError) as e:
        load_config(_cls("grpo"), None, ["lora.enabled=true", "lora.dropout=0.1"])
    assert e.value.where == "lora.dropout" and "model.dropout=keep" in str(e.value)
    with pytest.raises(ConfigError):
        load_config(_cls("sft"), None, ["lora.enabled=true", "lora.dropout=0.1", "model.dropout=off"])


@pytest.fixture
def dropout_model(tiny_path, tmp_path):
    """The tiny model saved with an attention dropout of 0.5 (as a checkpoint may carry one)."""
    model = load_causal_lm(ModelConfig(name_or_path=tiny_path))
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def _two_training_forwards(model):
    model.train()
    with torch.no_grad():  # LoRA's B starts at zero: give it a value so its dropout would show
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.arange(3, 19).view(2, 8)
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    return a, model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [False, True])
def test_off_removes_every_dropout_in_training_mode_and_keep_leaves_it(dropout_model, lora):
    lcfg = LoraConfig(enabled=lora, dropout=0.0)
    a, b = _two_training_forwards(load_policy(ModelConfig(name_or_path=dropout_model, dropout="keep"), lcfg))
    assert not torch.equal(a, b)  # the checkpoint's attention dropout is live in training mode
    off = load_policy(ModelConfig(name_or_path=dropout_model, dropout="off"), lcfg)
    a, b = _two_training_forwards(off)
    assert off.training and torch.equal(a, b)
    assert off.config.attention_dropout == 0.5  # the saved model keeps the user's rate


def test_off_removes_lora_dropout_too(tiny_path):
    """With dropout kept, a LoRA dropout alone makes two training forwards differ; a model.dropout=off
    load with it (a config built without validation) has none."""
    keep = load_policy(ModelConfig(name_or_path=tiny_path, dropout="keep"), LoraConfig(enabled=True, dropout=0.5))
    a, b = _two_training_forwards(keep)
    assert not torch.equal(a, b)
    off = load_policy(ModelConfig(name_or_path=tiny_path, dropout="off"), LoraConfig(enabled=True, dropout=0.5))
    a, b = _two_training_forwards(off)
    assert torch.equal(a, b)
