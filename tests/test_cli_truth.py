"""The command line tells the truth: the resolved config before a run, what happened during it, and no
silent success (each test failed before the change it covers)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from posttrain.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAST_SFT = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=8", "train.log_every=1",
            "task_eval_prompts=4", "task_eval_samples=1"]


def cli(*args):
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


# ----------------------------------------------------------------------------- the config before a run


def test_print_config_is_the_resolved_config_with_changes_marked_and_loads_nothing():
    code, out = cli("grpo", "--config", str(ROOT / "recipes/dapo.yaml"), "--print-config", "train.lr=3e-5")
    assert code == 0
    assert "variant: dapo  # default: 'grpo'" in out and "clip_high: 0.28  # default: 0.2" in out
    assert "beta: 0.0  # default: 0.04" in out and "lr: 3.0e-05  # default: 1e-05" in out
    assert "estimator: k3\n" in out  # unchanged keys carry no mark
    assert "run directory" not in out  # a dry run: no run directory, data or model


def test_help_with_a_config_shows_that_configs_values_and_the_choices():
    code, out = cli("grpo", "--config", str(ROOT / "recipes/dapo.yaml"), "--help")
    assert code == 0 and "[--resume]" in out.splitlines()[0]
    assert "variant (one of grpo | dr_grpo | dapo | gspo | cispo) = 'dapo'   * default 'grpo'" in out
    assert "loss.clip_high (float | None) = 0.28   * default" in out
    code, out = cli("sft", "--help")
    assert "data.format (one of auto | hh | plain) = 'auto'" in out and "* default" not in out


def test_a_preset_for_another_command_is_an_error():
    code, out = cli("sft", "--config", str(ROOT / "recipes/dapo.yaml"), "--print-config")
    assert code == 2 and "is a preset for `posttrain grpo`, but the command is `posttrain sft`" in out


def test_suggestions_by_meaning_and_misspelled_options():
    code, out = cli("sft", "train.learning_rate=1e-4")
    assert code == 2 and "did you mean 'train.lr'?" in out
    code, out = cli("grpo", "num_generations=4")
    assert code == 2 and "did you mean 'rollout.group_size'?" in out
    code, out = cli("dpo", "max_seq_length=512")
    assert "did you mean 'data.max_length'?" in out
    code, out = cli("grpo", "--confg", "recipes/grpo.yaml")
    assert code == 2 and "no option '--confg'. Did you mean '--config'?" in out


def test_help_texts_cite_files_that_exist():
    import re

    from posttrain.commands import COMMANDS, load_command
    from posttrain.config_view import describe

    cited = set()
    for name in COMMANDS:
        for _, _, _, help_text, source in describe(load_command(name)[0]):
            text = help_text + " " + source
            cited |= set(re.findall(r"([\w./-]+\.(?:md|py))\b", text)) | set(re.findall(r"(recipes/[\w.-]+\.yaml)", text))
    missing = {c for c in cited if not any((ROOT / d / c).exists() for d in ("", "docs", "posttrain"))}
    assert not missing, missing


# ----------------------------------------------------------------------------- what happened


def test_per_step_lines_when_stdout_is_a_file(tmp_path):
    log = tmp_path / "log.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-m", "posttrain", "sft", f"train.output_dir={tmp_path / 'run'}",
                            *FAST_SFT], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    assert f"posttrain sft: run directory {tmp_path / 'run'}, seed 0" in text
    assert "sft: 3 steps" in text and "sft: finished in" in text
    for step in (1, 2, 3):
        assert f"sft step {step}/3 | loss " in text
    assert "tok/s" in text and "eta" in text


def test_resume_says_what_it_does_and_a_finished_run_is_not_reused(tmp_path):
    from posttrain.algorithms.sft import SFTConfig, run
    from posttrain.config import load_config
    from posttrain.errors import ConfigError

    out = tmp_path / "run"
    base = [f"train.output_dir={out}", "train.progress=false", *FAST_SFT]
    code, text = cli("sft", *base, "--resume")
    assert code == 0 and f"resume: no checkpoint in {out / 'checkpoints'}: starting fresh" in text
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    with pytest.raises(ConfigError, match="already holds a run"):
        run(load_config(SFTConfig, None, base))
    code, text = cli("sft", *base, "--resume")  # finished, no checkpoint: nothing to resume
    assert code == 2 and "finished run that kept no checkpoint" in text, text
    shutil.rmtree(out / "final")  # as if interrupted before its first checkpoint: a fresh run replaces it
    code, text = cli("sft", *base, "--resume")
    again = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert code == 0 and "replacing the run that was there" in text and again == steps
    code, text = cli("sft", *base, "train.overwrite=true", "train.max_steps=2")
    assert code == 0 and "replacing the run that was there" in text
    after = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert after == sorted(after) and max(after) == 2 and max(steps) == 3  # never two runs interleaved
    code, text = cli("sft", *base, "train.save_every=1", "train.overwrite=true")
    code, text = cli("sft", *base, "train.save_every=1", "train.max_steps=4", "--resume")
    assert code == 0 and "resume: resuming from step 3" in text


# ----------------------------------------------------------------------------- no silent success


def test_your_prompts_never_get_the_builtin_reward_by_default(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n')
    for command in ("grpo", "ppo", "rloo", "best-of-n"):
        code, out = cli(command, f"rollout.prompts={prompts}", "--print-config")
        assert code == 2 and "no reward given for your prompts" in out, (command, out)
    code, out = cli("grpo", f"rollout.prompts={prompts}", "reward=[exact_match]", "--print-config")
    assert code == 0 and "reward: [exact_match]" in out
    code, out = cli("grpo", "--print-config")
    assert "reward: [builtin_correct]" in out  # the built-in task keeps its verifiable reward


def test_rl_without_a_learning_signal_warns_then_stops(tmp_path):
    """The built-in reward on prompts it does not know scores every completion 0: a warning at the first
    such step, an error after train.stop_without_signal of them (files kept)."""
    from posttrain.algorithms.grpo import GRPOConfig, run
    from posttrain.config import load_config
    from posttrain.errors import TrainingError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say hello {i}."}) + "\n" for i in range(8)))
    cfg = load_config(GRPOConfig, None, [
        f"rollout.prompts={prompts}", "reward=[builtin_correct]", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.max_new_tokens=4", "train.max_steps=6", "train.stop_without_signal=3",
        "kl.beta=0", "kl.track=false", "train.progress=false", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match="3 RL steps in a row without a learning signal"):
        run(cfg)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 3


def test_a_judge_whose_verdicts_cannot_be_read_fails_loudly(tmp_path, monkeypatch):
    from posttrain.errors import ModelError
    from posttrain.judges import commands
    from posttrain.judges.commands import JudgeConfig, run_judge
    from posttrain.config import load_config

    class Mumbles:
        name = "mumbles"

        def complete(self, conversations, **kw):
            return ["hmm, hard to say" for _ in conversations]

    monkeypatch.setattr(commands, "_make_backend", lambda spec, opts, seed: Mumbles())
    cfg = load_config(JudgeConfig, None, ["max_pairs=4", f"output_dir={tmp_path / 'j'}"])
    with pytest.raises(ModelError, match="no parseable verdict"):
        run_judge(cfg)
    assert (tmp_path / "j" / "judgments.jsonl").exists()  # the replies are kept to read


# ----------------------------------------------------------------------------- out of the box


def test_a_missing_earlier_output_names_the_command_that_writes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = cli("grpo", "--config", str(ROOT / "recipes/grpo.yaml"), f"train.output_dir={tmp_path / 'g'}")
    assert code == 2 and "runs/sft/final does not exist yet" in out and "posttrain sft" in out


def test_python_dash_m_and_the_recipes_list():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "posttrain", "recipes"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and "dapo.yaml" in r.stdout and "grpo" in r.stdout
    assert "--config" in r.stdout
