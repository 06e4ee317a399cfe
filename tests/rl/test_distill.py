"""On-policy distillation (posttrain distill): the advantage math by hand, the refusals, and learning."""

import json

import pytest
import torch

from posttrain.advantages import distillation_advantages
from posttrain.config import load_config
from posttrain.errors import ConfigError


def test_per_token_advantages_are_teacher_minus_student_on_valid_tokens():
    s = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    t = torch.tensor([[-0.5, -2.5, -0.5], [-0.3, -1.0, -9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a = distillation_advantages(s, t, m)
    assert torch.allclose(a, torch.tensor([[0.5, -0.5, 0.0], [-0.2, 2.0, 0.0]]))
    # γ = 1: reward-to-go, Σ_{k>=t} r_k over the valid tokens of each row (the masked one is skipped)
    a1 = distillation_advantages(s, t, m, gamma=1.0)
    assert torch.allclose(a1, torch.tensor([[0.0, -0.5, 0.0], [1.8, 2.0, 0.0]]))
    a5 = distillation_advantages(s, t, m, gamma=0.5)
    assert torch.allclose(a5, torch.tensor([[0.5 - 0.25, -0.5, 0.0], [-0.2 + 1.0, 2.0, 0.0]]))


def test_a_student_equal_to_its_teacher_gets_no_signal():
    lp = torch.randn(4, 6)
    assert distillation_advantages(lp, lp.clone(), torch.ones(4, 6)).abs().max() == 0


def test_distill_needs_a_teacher_with_the_students_tokenizer(monkeypatch, tiny_path):
    from posttrain.algorithms import distill

    with pytest.raises(ConfigError, match="distillation needs a teacher"):
        load_config(distill.DistillConfig, None, [f"model.name_or_path={tiny_path}"])

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    vocabs = {"student": {"a": 0, "b": 1}, "teacher": {"a": 0, "c": 1}}
    monkeypatch.setattr(distill, "tokenizer_for", lambda cfg: Tok(vocabs[cfg.name_or_path]))
    cfg = load_config(distill.DistillConfig, None, ["model.name_or_path=student", "teacher.name_or_path=teacher"],
                      check=False)
    with pytest.raises(ConfigError, match=r"different tokenizers \(2 vocabulary entries differ\)"):
        distill.check_same_tokenizer(cfg.model, cfg.teacher)


@pytest.mark.slow
def test_on_policy_distillation_moves_the_student_toward_a_stronger_teacher(sft_policy, grpo_teacher, tmp_path):
    """The SFT student (held-out accuracy ~0.64) distilled on its own samples from the GRPO teacher
    (~0.77): its accuracy rises and its reverse KL to the teacher falls."""
    from posttrain.algorithms.distill import DistillConfig, run

    cfg = load_config(DistillConfig, None, [
        f"model.name_or_path={sft_policy}", f"teacher.name_or_path={grpo_teacher}", f"train.output_dir={tmp_path}",
        "rollout.prompts_per_step=32", "rollout.group_size=4", "train.max_steps=20", "train.lr=1e-4",
        "train.progress=false", "task_eval_prompts=64", "task_eval_samples=4"])
    s = run(cfg)
    assert s["final"]["accuracy"] > s["initial"]["accuracy"] + 0.04, (s["initial"], s["final"])
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in rows if "distill/reverse_kl" in r]
    assert sum(kl[-3:]) / 3 < 0.5 * sum(kl[:3]) / 3, kl
    assert s["teacher"] == grpo_teacher and "teacher_s" in rows[1]
