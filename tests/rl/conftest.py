"""Fixtures for the RL tests: a reward model, a stronger policy and the tool task's SFT models, trained
once with the project's own commands and cached (``pt_helpers.cached_run``); the SFT policy they start
from is tests/conftest.py's ``sft_policy``."""

import pytest

from pt_helpers import cached_run

# pairs sampled from the SFT policy itself and labelled by simulated annotators, as in the demo: a
# reward model trained on off-policy demonstrator pairs ranks the policy's own mistakes poorly
# (rotated answers scored like correct ones), and PPO then raises its score but not the gold reward
PREFS_OVERRIDES = ["n_prompts=500", "k=3", "heldout_prompts=150"]
RM_OVERRIDES = ["train.epochs=3", "train.progress=false", "train.log_every=20"]


@pytest.fixture(scope="session")
def reward_model(sft_policy) -> str:
    """final/ of a Bradley–Terry reward model trained from the SFT model on pairs of its own samples
    labelled by simulated annotators (held-out pairs labelled by the gold reward)."""
    from posttrain.algorithms import collect
    from posttrain.algorithms.reward import RewardConfig, run

    prefs = cached_run("prefs", collect.CollectConfig, collect.run,
                       [f"model.name_or_path={sft_policy}", *PREFS_OVERRIDES], out_key="output_dir")
    data = [f"data.train={prefs}/train.jsonl", f"data.eval={prefs}/heldout.jsonl"]
    return str(cached_run("rm", RewardConfig, run, [f"model.name_or_path={sft_policy}", *data, *RM_OVERRIDES])
               / "final")


@pytest.fixture(scope="session")
def grpo_teacher(sft_policy) -> str:
    """final/ of a stronger policy of the built-in task: the SFT model after 30 GRPO steps (held-out
    accuracy ~0.77 against its ~0.64), the teacher of the distillation tests."""
    from posttrain.algorithms.grpo import GRPOConfig, run

    return str(cached_run("grpo-teacher", GRPOConfig, run, [
        f"model.name_or_path={sft_policy}", "reward=builtin_correct", "rollout.prompts_per_step=32",
        "rollout.group_size=8", "train.max_steps=30", "train.lr=1e-4", "train.progress=false",
        "task_eval_prompts=64"]) / "final")


# from the task's SFT model (it already copies digits), in small batches, as the demo's tool stage does:
# the tool-call format is learnt in 2.5 epochs (~40 s for both models), where 6 epochs from the tiny model
# in batches of 32 took ~4 minutes and ended lower
TOOL_SFT = ["data.eval=null", "task_eval=false", "train.epochs=2.5", "train.batch_size=8",
            "train.micro_batch_size=8", "train.progress=false"]


@pytest.fixture(scope="session")
def tool_sft_policy(sft_policy) -> str:
    """final/ of the SFT model of the built-in tool task, trained on demonstrations that call the
    calculator (held-out episode accuracy ~0.40: the demonstrator is right ~60% of the time)."""
    from posttrain.algorithms.sft import SFTConfig, run

    return str(cached_run("tool-sft", SFTConfig, run, [f"model.name_or_path={sft_policy}", "data.train=builtin:tool_sft",
                                                       *TOOL_SFT]) / "final")


@pytest.fixture(scope="session")
def notool_sft_policy(sft_policy) -> str:
    """final/ of the same task's SFT model without the tool (answers the sum directly; ~0.22)."""
    from posttrain.algorithms.sft import SFTConfig, run

    return str(cached_run("notool-sft", SFTConfig, run, [f"model.name_or_path={sft_policy}",
                                                         "data.train=builtin:tool_sft_notools", *TOOL_SFT]) / "final")
