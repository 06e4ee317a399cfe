"""The RL recipes load and validate with their config classes; command names match the CLI entries
the lead registers (see docs/rl.md)."""

from pathlib import Path

import pytest

from posttrain.config import load_config, read_yaml

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "grpo": ("posttrain.algorithms.grpo", "GRPOConfig"),
    "rloo": ("posttrain.algorithms.rloo", "RLOOConfig"),
    "reinforce": ("posttrain.algorithms.reinforce", "ReinforceConfig"),
    "ppo": ("posttrain.algorithms.ppo", "PPOConfig"),
    "best-of-n": ("posttrain.algorithms.best_of_n", "BestOfNConfig"),
}
RECIPES = ["grpo", "dr_grpo", "dapo", "gspo", "cispo", "rloo", "reinforce", "ppo", "best_of_n"]


def _cls(command):
    import importlib

    module, name = CLASSES[command]
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", RECIPES)
def test_rl_recipe_loads(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    command = read_yaml(path)["command"]
    cfg = load_config(_cls(command), path)
    if name in ("dr_grpo", "dapo", "gspo", "cispo"):
        assert cfg.variant == name


def test_recipes_set_what_their_variant_means():
    dapo = load_config(_cls("grpo"), ROOT / "recipes" / "dapo.yaml")
    assert dapo.dynamic_sampling and dapo.loss.clip_high > dapo.loss.clip_low and dapo.loss.aggregation == "token_mean"
    assert dapo.shaping.overlong_buffer > 0
    ppo = load_config(_cls("ppo"), ROOT / "recipes" / "ppo.yaml")
    assert ppo.value.init == "reward_model" and ppo.kl.controller == "adaptive"


def test_cli_registry_entries():
    from posttrain.cli import COMMANDS

    for command, (module, cls) in CLASSES.items():
        assert (COMMANDS[command].module, COMMANDS[command].config) == (module, cls)


def test_unknown_key_and_bad_values_are_errors():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'kl.beta'"):
        load_config(_cls("grpo"), None, ["kl.bta=0.1"])
    with pytest.raises(ConfigError, match="value.init=reward_model needs a reward model"):
        load_config(_cls("ppo"), None, ["value.init=reward_model"])
    with pytest.raises(ConfigError, match="baseline_n"):
        load_config(_cls("best-of-n"), None, ["rollout.group_size=4", "baseline_n=[1,8]"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(_cls("grpo"), None, ["rollout.temperature=0"])


def test_best_of_n_refuses_training_only_rollout_options():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.correction"):
        load_config(_cls("best-of-n"), None, ["rollout.correction=none"])
    assert load_config(_cls("best-of-n"), None, ["rollout.engine_dtype=model"]).rollout.engine_dtype == "model"


def test_the_rollout_engine_is_chosen_in_one_place():
    """rollout.engine selects vLLM (GPU only); what cannot work is refused at start-up, not ignored."""
    import torch

    from posttrain.errors import ConfigError

    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.algorithms.ppo import PPOConfig
    from posttrain.engines.rollout import HFRolloutEngine
    from posttrain.rollouts.config import RolloutConfig
    from posttrain.rollouts.experience import make_engine

    cfg = load_config(GRPOConfig, None, ["rollout.engine=vllm", "rollout.vllm_kwargs={gpu_memory_utilization: 0.3}"])
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm_kwargs == {"gpu_memory_utilization": 0.3}
    for cls in (GRPOConfig, PPOConfig):  # LoRA: the adapters are merged into the weights vLLM is sent
        assert load_config(cls, None, ["rollout.engine=vllm", "lora.enabled=true"]).lora.enabled
    with pytest.raises(ConfigError, match="rollout.engine is local"):
        load_config(GRPOConfig, None, ["rollout.vllm_kwargs={max_model_len: 512}"])
    assert load_config(GRPOConfig, None, ["rollout.engine=vllm", "rollout.vllm_sleep=2"]).rollout.vllm_sleep == 2
    for bad, match in ((["rollout.vllm_sleep=1"], "rollout.vllm_sleep=1 is set but rollout.engine is local"),
                       (["rollout.engine=vllm", "rollout.vllm_sleep=3"], "must be 0, 1 or 2"),
                       (["rollout.engine=vllm", "rollout.vllm_sleep=1", "rollout.vllm_kwargs={enable_sleep_mode: true}"],
                        "which rollout.vllm_sleep sets")):
        with pytest.raises(ConfigError, match=match):
            load_config(GRPOConfig, None, bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            make_engine(None, None, RolloutConfig(engine="vllm"), "tiny")
    from posttrain.models.loading import load_policy, tokenizer_for
    from posttrain.config import ModelConfig

    tok = tokenizer_for(ModelConfig())
    assert isinstance(make_engine(load_policy(ModelConfig()), tok, RolloutConfig()), HFRolloutEngine)
