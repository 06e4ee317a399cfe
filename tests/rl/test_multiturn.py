"""GRPO on multi-turn episodes (rollout.environment): the plumbing on the tiny model, and learning on
the built-in tool task, where the calculator measurably helps."""

import json

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError

TASK = ["rollout.prompts=builtin:tool_prompts", "rollout.max_new_tokens=96", "train.progress=false",
        "task_eval_prompts=64", "task_eval_samples=4"]


def _grpo(model, out, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    return run(load_config(GRPOConfig, None, [f"model.name_or_path={model}", f"train.output_dir={out}", *TASK,
                                              *extra]))


def test_grpo_runs_episodes_and_logs_them(tiny_path, tmp_path):
    s = _grpo(tiny_path, tmp_path, "rollout.environment=builtin:calc", "rollout.prompts_per_step=4",
              "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.max_episode_tokens=24",
              "train.max_steps=1", "task_eval_prompts=4", "task_eval_samples=1")
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "reward/mean" in r)
    for k in ("episode/turns", "episode/tool_calls", "episode/tool_errors", "episode/masked_frac",
              "episode/truncated_turns", "episode/truncated_tokens", "batch/rollouts"):
        assert k in step, k
    assert step["batch/rollouts"] == 8 and "accuracy" in s["final"] and "episode/turns" in s["final"]


@pytest.mark.parametrize("command", ["rloo", "reinforce"])
def test_rloo_and_reinforce_run_episodes_of_a_module_environment(tool_sft_policy, tmp_path, command):
    """rollout.environment=module:Class (a user's environment on PYTHONPATH: tests/pt_helpers.py's two-turn
    one) under the two other estimators of the GRPO loop, with a policy that ends its turns: the episodes
    take the environment's two turns and earn its rewards."""
    from posttrain.commands import COMMANDS, load_command

    cls, run = load_command(COMMANDS[command])
    run(load_config(cls, None, [f"model.name_or_path={tool_sft_policy}", f"train.output_dir={tmp_path}", *TASK,
                                "rollout.environment=pt_helpers:TwoTurnEnv", "reward=[]", "rollout.prompts_per_step=4",
                                "rollout.group_size=2", "rollout.max_episode_tokens=400",
                                "train.max_steps=1", "task_eval_prompts=4", "task_eval_samples=1"]))
    step = next(json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward/mean" in r)
    assert step["episode/turns"] == 2 and step["batch/rollouts"] == 8, step
    assert 0 < step["reward/mean"] <= 1.0, step  # up to 0.5 a turn, for up to 8 characters


def test_an_environment_brings_its_own_reward(tiny_path, tmp_path):
    from posttrain.algorithms.grpo import GRPOConfig

    from posttrain.algorithms.ppo import PPOConfig

    with pytest.raises(ConfigError, match="the environment gives the reward"):
        load_config(GRPOConfig, None, [f"model.name_or_path={tiny_path}", "rollout.environment=builtin:calc",
                                       "reward=builtin_correct", *TASK])
    with pytest.raises(ConfigError, match="multi-turn episodes with several Ray learners"):
        load_config(GRPOConfig, None, [f"model.name_or_path={tiny_path}", "rollout.environment=builtin:calc",
                                       "launcher=ray", "ray.learners=2", *TASK])
    with pytest.raises(ConfigError, match="the environment gives the reward"):
        load_config(PPOConfig, None, [f"model.name_or_path={tiny_path}", "rollout.environment=builtin:calc",
                                      "reward=builtin_gold", *TASK])
    from posttrain.algorithms.distill import DistillConfig

    with pytest.raises(ConfigError, match="distill does not run multi-turn episodes yet"):
        load_config(DistillConfig, None, [f"model.name_or_path={tiny_path}", f"teacher.name_or_path={tiny_path}",
                                          "rollout.environment=builtin:calc", *TASK])


def test_ppo_runs_episodes_with_gae_over_the_sampled_tokens(tiny_path, tmp_path):
    from posttrain.algorithms.ppo import PPOConfig, run

    s = run(load_config(PPOConfig, None, [
        f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}", "rollout.environment=builtin:calc", *TASK,
        "rollout.prompts_per_step=4", "rollout.max_new_tokens=8", "rollout.max_episode_tokens=24",
        "train.max_steps=1", "train.batch_size=4", "task_eval_prompts=4", "task_eval_samples=1"]))
    step = next(json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward/mean" in r)
    assert step["batch/rollouts"] == 4 and "episode/turns" in step and "value_loss" in step
    assert "accuracy" in s["final"]


@pytest.mark.slow
def test_grpo_with_the_calculator_learns_and_beats_the_no_tool_baseline(tool_sft_policy, notool_sft_policy,
                                                                        tmp_path):
    """Same RL budget (8 steps of 16 prompts x 8 episodes): GRPO with the calculator raises held-out
    accuracy well over its SFT model (0.40 -> 0.62 here) and ends far above the no-tool model trained the
    same way (0.22 -> 0.23)."""
    budget = ["rollout.prompts_per_step=16", "rollout.group_size=8", "train.max_steps=8", "train.lr=2e-4"]
    tools = _grpo(tool_sft_policy, tmp_path / "tools", "rollout.environment=builtin:calc", *budget)
    plain = _grpo(notool_sft_policy, tmp_path / "plain", "rollout.environment=builtin:no_tools", *budget)
    assert tools["final"]["accuracy"] > tools["initial"]["accuracy"] + 0.1, (tools["initial"], tools["final"])
    assert tools["final"]["accuracy"] > plain["final"]["accuracy"] + 0.15, (tools["final"], plain["final"])
    assert tools["final"]["episode/tool_calls"] > 0.8  # it answers through the tool
    assert plain["final"]["episode/tool_calls"] == 0
