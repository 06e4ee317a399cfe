"""Options a command would accept and then never read are refused at start-up, naming the key and the one that
decides (config_checks.check_ignored and the commands' validate()); the same options where they are read load."""

import pytest

from posttrain.commands import COMMANDS, load_command
from posttrain.config import load_config
from posttrain.errors import ConfigError

TEACHER = ["teacher.name_or_path=tiny"]

REFUSED = [
    ("sft", ["lora.r=8"], "lora.r"),
    ("dpo", ["lora.target_modules=all-linear"], "lora.target_modules"),
    ("sft", ["train.epochs=1.5", "train.max_steps=5"], "train.epochs"),
    ("grpo", ["train.epochs=3"], "train.epochs"),  # grpo runs train.max_steps=200 by default
    ("grpo", ["ray.rollout_workers=4"], "ray.rollout_workers"),
    ("ppo", ["ray.learners=2"], "ray.learners"),
    ("grpo", ["rollout.environment=builtin:calc", "reward=[]", "shaping.truncated=penalize"], "shaping.truncated"),
    ("dapo", ["rollout.environment=builtin:calc", "reward=[]"], "shaping.overlong_buffer"),
    ("grpo", ["rollout.environment=builtin:calc", "reward=[]", "launcher=ray", "async.max_staleness=1"],
     "async.max_staleness"),
    ("grpo", ["rollout.max_turns=8"], "rollout.max_turns"),
    ("grpo", ["rollout.engine=server", "rollout.servers=[http://127.0.0.1:8001/v1]", "rollout.engine_dtype=model"],
     "rollout.engine_dtype"),
    ("rloo", ["rollout.server_retries=5"], "rollout.server_retries"),
    ("grpo", ["kl.controller=adaptive", "kl.beta=0"], "kl.controller"),
    ("dpo", ["data.scores_as_margin=true"], "data.scores_as_margin"),
    ("kto", ["lora.enabled=true", "ref_model=tiny"], "ref_model"),
    ("sft", ["data.format=hh"], "data.format"),
    ("online-dpo", ["kl.placement=reward"], "kl.placement"),
    ("online-dpo", ["kl.beta=0.1"], "kl.beta"),
    ("dpo", ["eval_holdout=8", "data.eval=y.jsonl"], "eval_holdout"),
    ("sft", ["data.train=x.jsonl", "data.eval=y.jsonl", "data.eval_fraction=0.1"], "data.eval_fraction"),
    ("reward", ["data.train=x.jsonl", "eval_holdout=8", "data.eval_fraction=0.1"], "data.eval_fraction"),
    ("online-dpo", ["rollout.correction=none"], "rollout.correction"),
    ("distill", [*TEACHER, "kl.placement=reward"], "kl.placement"),
    ("best-of-n", ["rollout.environment=builtin:calc"], "rollout.environment"),
    ("best-of-n", ["top_k=4"], "top_k"),
    ("best-of-n", ["train.lr=1e-5"], "train.lr"),
    ("collect", ["annotators=none", "labels_per_pair=3"], "labels_per_pair"),
    ("grpo", ["shaping.truncation_penalty=-2"], "shaping.truncation_penalty"),
    ("grpo", ["rollout.correction=none", "rollout.tis_cap=5"], "rollout.tis_cap"),
    ("grpo", ["max_sample_rounds=5"], "max_sample_rounds"),
    ("distill", [*TEACHER, "teacher.dropout=off"], "teacher.dropout"),
    ("distill", ["teacher_server=http://127.0.0.1:8001/v1", "teacher.dtype=bfloat16"], "teacher.dtype"),
]

ACCEPTED = [
    ("sft", ["lora.enabled=true", "lora.r=8"]),
    ("sft", ["train.max_steps=5"]),
    ("grpo", ["train.epochs=3", "train.max_steps=null"]),
    ("grpo", ["launcher=ray", "ray.rollout_workers=2"]),
    ("grpo", ["rollout.environment=builtin:calc", "reward=[]", "rollout.max_turns=8"]),
    ("grpo", ["rollout.engine=server", "rollout.servers=[http://127.0.0.1:8001/v1]", "rollout.server_retries=5"]),
    ("distill", ["teacher_server=http://127.0.0.1:8001/v1", "rollout.server_timeout_s=60"]),
    ("ppo", ["kl.controller=adaptive"]),
    ("reward", ["data.scores_as_margin=true"]),
    ("dpo", ["ref_model=tiny"]),
    ("best-of-n", ["selection=top_k", "top_k=4"]),
    ("best-of-n", ["finetune=true", "train.lr=1e-5"]),
    ("grpo", ["shaping.truncated=penalize", "shaping.truncation_penalty=-2"]),
    ("dapo", ["max_sample_rounds=5"]),
    ("dpo", ["data.train=x.jsonl", "eval_holdout=8"]),
    ("sft", ["data.train=x.jsonl", "data.eval_fraction=0.1"]),
]


def _load(name, overrides):
    variant = {"dapo": ("grpo", ["variant=dapo"])}.get(name)
    if variant:
        name, overrides = variant[0], [*variant[1], *overrides]
    return load_config(load_command(COMMANDS[name])[0], None, overrides)


@pytest.mark.parametrize("name,overrides,where", REFUSED)
def test_an_option_the_run_would_never_read_is_refused(name, overrides, where):
    with pytest.raises(ConfigError) as e:
        _load(name, overrides)
    assert e.value.where == where, str(e.value)
    assert e.value.fix, str(e.value)


@pytest.mark.parametrize("name,overrides", ACCEPTED)
def test_the_same_options_where_they_are_read_load(name, overrides):
    _load(name, overrides)


TRAINING = ["sft", "reward", "dpo", "kto", "grpo", "rloo", "reinforce", "ppo", "distill", "online-dpo", "best-of-n",
            "collect"]


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_command_loads_with_its_defaults(name):
    """The checks compare with each command's own defaults, so none of them refuses a default."""
    _load(name, TEACHER if name == "distill" else [])
