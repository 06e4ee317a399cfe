"""Fixtures for the RL tests: an SFT policy and a reward model on the built-in task, trained once
with the project's own commands and cached in $POSTTRAIN_CACHE (keyed by their configs and the
source of the code that trains them), like the tiny model itself."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SFT_OVERRIDES = ["train.epochs=2", "data.eval=null", "task_eval=false", "train.progress=false"]
# pairs sampled from the SFT policy itself and labelled by simulated annotators, as in the demo: a
# reward model trained on off-policy demonstrator pairs ranks the policy's own mistakes poorly
# (rotated answers scored like correct ones), and PPO then raises its score but not the gold reward
PREFS_OVERRIDES = ["n_prompts=500", "k=3", "heldout_prompts=150"]
RM_OVERRIDES = ["train.epochs=3", "train.progress=false", "train.log_every=20"]
_SOURCES = ["posttrain/algorithms/sft.py", "posttrain/algorithms/reward.py", "posttrain/algorithms/collect.py",
            "posttrain/tasks/annotators.py", "posttrain/losses/sft.py",
            "posttrain/losses/reward.py", "posttrain/engines/train.py", "posttrain/tasks/builtin.py",
            "posttrain/models/tiny.py", "posttrain/models/heads.py", "posttrain/data/chat.py",
            "posttrain/data/batching.py"]


def _key(name: str, overrides: list[str]) -> str:
    h = hashlib.sha256(json.dumps([name, overrides]).encode())
    for rel in _SOURCES:
        p = ROOT / rel
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def cached_run(name: str, cls, run, overrides: list[str], out_key: str = "train.output_dir") -> Path:
    """Run a command once into $POSTTRAIN_CACHE/rl-fixtures/<name>-<key> (atomic rename); return it."""
    from posttrain.config import load_config

    cache = Path(os.environ["POSTTRAIN_CACHE"]) / "rl-fixtures"
    out = cache / f"{name}-{_key(name, overrides)}"
    if (out / "summary.json").exists():
        return out
    tmp = cache / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    run(load_config(cls, None, [f"{out_key}={tmp}", *overrides]))
    if not out.exists():
        os.replace(tmp, out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def sft_policy(tiny_path) -> str:
    """final/ of an SFT model of the built-in task (imitates the noisy demonstrator: accuracy ~0.6)."""
    from posttrain.algorithms.sft import SFTConfig, run

    return str(cached_run("sft", SFTConfig, run, ["model.name_or_path=tiny", *SFT_OVERRIDES]) / "final")


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


TOOL_SFT = ["model.name_or_path=tiny", "data.eval=null", "task_eval=false", "train.epochs=6", "train.progress=false"]


@pytest.fixture(scope="session")
def tool_sft_policy(tiny_path) -> str:
    """final/ of the SFT model of the built-in tool task, trained on demonstrations that call the
    calculator (held-out episode accuracy ~0.34: the demonstrator is right ~60% of the time)."""
    from posttrain.algorithms.sft import SFTConfig, run

    return str(cached_run("tool-sft", SFTConfig, run, ["data.train=builtin:tool_sft", *TOOL_SFT]) / "final")


@pytest.fixture(scope="session")
def notool_sft_policy(tiny_path) -> str:
    """final/ of the same task's SFT model without the tool (answers the sum directly; ~0.24)."""
    from posttrain.algorithms.sft import SFTConfig, run

    return str(cached_run("notool-sft", SFTConfig, run, ["data.train=builtin:tool_sft_notools", *TOOL_SFT]) / "final")
