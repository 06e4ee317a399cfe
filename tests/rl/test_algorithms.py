"""Algorithm-level pieces: PPO rewards/GAE placement, best-of-N selection, short end-to-end runs on
the tiny model (run directory, LoRA reference, exact resume)."""

import json
import math

import pytest
import torch

from posttrain.config import load_config
from posttrain.rollouts.experience import Experience


def _exp(scores, lengths, valid=None):
    n, T = len(scores), max(lengths)
    mask = torch.zeros(n, T)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1
    return Experience(prompts=["p"] * n, prompt_ids=[[1]] * n, completion_ids=[[5] * L for L in lengths],
                      texts=[""] * n, finish=["stop"] * n, group_size=1, scores=torch.tensor(scores),
                      valid=torch.tensor(valid or [True] * n), components={}, mask=mask,
                      rollout_logp=torch.zeros(n, T), values=torch.zeros(n, T))


def test_ppo_rewards_score_on_last_token_and_kl_per_token():
    from posttrain.algorithms.ppo import PPOConfig, advantages

    cfg = load_config(PPOConfig, None, ["loss.whiten_advantages=false", "loss.gamma=1", "loss.lam=1"])
    exp = _exp([2.0, -1.0], [3, 2])
    adv, ret = advantages(exp, cfg, 0.0, None)
    # γ = λ = 1, V = 0, no KL: every token's return is the sequence score
    assert torch.allclose(ret, torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]))
    assert torch.allclose(adv, ret)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])  # 9.0 sits on padding: ignored
    adv, ret = advantages(exp, cfg, 0.5, kl)
    # r_t = -β KL_t (+ score on the last token); return-to-go
    assert torch.allclose(ret[0], torch.tensor([2.0 - 0.3, 2.0 - 0.25, 2.0 - 0.15]))
    assert torch.allclose(ret[1], torch.tensor([-1.0 - 0.5, -1.0 - 0.25, 0.0]))
    # a rollout left out of the loss gets no score and no advantage
    exp = _exp([2.0, 3.0], [2, 2], valid=[True, False])
    exp.mask[1] = 0
    adv, _ = advantages(exp, cfg, 0.0, None)
    assert (adv[1] == 0).all()


def test_gae_uses_critic_values():
    from posttrain.algorithms.ppo import PPOConfig, advantages

    cfg = load_config(PPOConfig, None, ["loss.whiten_advantages=false", "loss.gamma=1", "loss.lam=0"])
    exp = _exp([1.0], [3])
    exp.values = torch.tensor([[0.2, 0.5, 0.9]])
    adv, ret = advantages(exp, cfg, 0.0, None)
    # λ = 0: one-step TD errors δ_t = r_t + V_{t+1} − V_t
    assert torch.allclose(adv[0], torch.tensor([0.5 - 0.2, 0.9 - 0.5, 1.0 - 0.9]))


def test_best_of_n_selection():
    from posttrain.algorithms.best_of_n import select

    R = [[0.1, 0.9, 0.3], [0.5, 0.2, 0.8], [0.0, 0.7, 0.7], [float("nan"), 0.4, 0.1]]
    assert select(R, "per_prompt") == [(0, 1), (1, 2), (2, 1), (3, 1)]  # ties: the first
    assert select(R, "top_k", k=3) == [(0, 1), (1, 2), (2, 1)]  # 0.9, 0.8, 0.7 (first of the tie)
    assert select([[float("nan")] * 2], "per_prompt") == []


def test_best_of_n_run_writes_sft_data_and_baseline(tmp_path, tiny_path):
    from posttrain.advantages import best_of_n_kl
    from posttrain.algorithms.best_of_n import BestOfNConfig, run

    cfg = load_config(BestOfNConfig, None, [
        f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}", "reward=builtin_gold",
        "rollout.max_prompts=8", "rollout.group_size=4", "rollout.max_new_tokens=6", "baseline_n=[1,2,4]"])
    s = run(cfg)
    rows = [json.loads(r) for r in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"prompt", "completion", "reward"} <= set(rows[0])
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 32
    curve = s["best_of_n"]
    assert [p["n"] for p in curve] == [1, 2, 4]
    assert curve[2]["kl"] == pytest.approx(math.log(4) - 3 / 4) == pytest.approx(best_of_n_kl(4))
    assert curve[0]["proxy"] <= curve[1]["proxy"] <= curve[2]["proxy"]
    assert curve[2]["proxy"] == pytest.approx(s["proxy_mean_selected"])  # n = N is the argmax
    assert curve[0]["gold"] == pytest.approx(s["gold_mean_all"])  # proxy is the gold reward here
    # selected SFT data loads as SFT records
    from posttrain.data.formats import load_records

    assert len(load_records(str(tmp_path / "selected.jsonl"), "sft")) == 8


def test_best_of_n_samples_with_the_rollout_options(tmp_path, tiny_path):
    """rollout.top_k reaches best-of-n's sampler: with top_k=1 every candidate of a prompt is its greedy one."""
    from posttrain.algorithms.best_of_n import BestOfNConfig, run

    run(load_config(BestOfNConfig, None, [
        f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}", "reward=builtin_gold",
        "rollout.max_prompts=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "rollout.top_k=1",
        "baseline_n=[1,4]"]))
    rows = [json.loads(r) for r in (tmp_path / "samples.jsonl").read_text().splitlines()]
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(json.dumps(r["prompt"]), set()).add(r["completion"])
    assert len(by_prompt) == 4 and all(len(c) == 1 for c in by_prompt.values()), by_prompt


def _grpo(tmp_path, tiny_path, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    cfg = load_config(GRPOConfig, None, [
        f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}", "reward=builtin_gold",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=8", "train.lr=1e-3",
        "train.progress=false", "task_eval_prompts=4", "task_eval_samples=1", *extra])
    return run(cfg)


def test_grpo_run_directory_and_metrics(tmp_path, tiny_path):
    s = _grpo(tmp_path, tiny_path, "train.max_steps=2", "train.batch_size=8", "loss.ppo_epochs=2",
              "rollout.engine_dtype=model", "reward=pt_helpers:text_length_reward")
    assert s["optimizer_steps_per_rl_step"] == 4 and s["rollouts_per_step"] == 16
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    r = train[-1]
    # several updates per batch: π_old was stored, ratios move away from 1, KL is measured on it
    assert r["ratio/max"] > 1.0 and "kl" in r and r["logprob_gap"] < 1e-3 and 0 <= r["reward/std_zero_frac"] <= 1
    assert abs(r["tis/weight_mean"] - 1) < 1e-3 and r["tis/capped_frac"] == 0  # an exact engine: w = 1
    assert (tmp_path / "final" / "model.safetensors").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"initial", "final", "last_step"} <= set(summary)
    cfg = (tmp_path / "config.yaml").read_text()
    assert "variant: grpo" in cfg and "aggregation: seq_mean_token_mean" in cfg  # resolved values saved


def test_lora_reference_is_the_base_model(tmp_path, tiny_path):
    s = _grpo(tmp_path, tiny_path, "train.max_steps=1", "lora.enabled=true", "lora.r=4", "kl.beta=0.1")
    r = s["last_step"]
    assert abs(r["kl"]) < 1e-5  # adapters start at zero: policy = reference before the first update
    assert (tmp_path / "final" / "adapter_config.json").exists()


def test_ppo_checkpoints_the_activations_of_the_policy_and_the_critic(tmp_path, tiny_path):
    """train.gradient_checkpointing on PPO's actor-critic (not itself a Hugging Face model): each model in it
    recomputes its activations in the backward, and the step is the one without (it used to stop the run)."""
    from posttrain.algorithms.ppo import PPOConfig, run

    rows = {}
    for ckpt in ("false", "true"):
        run(load_config(PPOConfig, None, [
            f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path / ckpt}", "reward=builtin_gold",
            "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=8", "train.max_steps=1",
            "train.progress=false", "task_eval_prompts=4", "task_eval_samples=1", "rollout.engine_dtype=model",
            f"train.gradient_checkpointing={ckpt}"]))
        lines = (tmp_path / ckpt / "metrics.jsonl").read_text().splitlines()
        rows[ckpt] = [json.loads(r) for r in lines if "reward/mean" in r][0]
    for k in ("train/loss", "value_loss", "train/grad_norm"):
        assert rows["true"][k] == pytest.approx(rows["false"][k], rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_resume_is_exact(tmp_path, tiny_path):
    """Two steps, checkpoint, resume for a third = three uninterrupted steps, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    _grpo(a, tiny_path, "train.max_steps=3", "task_eval_prompts=1")
    _grpo(b, tiny_path, "train.max_steps=2", "train.save_every=1", "task_eval_prompts=1")
    _grpo(b, tiny_path, "train.max_steps=3", "train.save_every=1", "train.resume=true", "task_eval_prompts=1")

    def step3(d):
        rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if r["step"] == 3 and "reward/mean" in r][0]

    ra, rb_ = step3(a), step3(b)
    for k in ("reward/mean", "train/loss", "train/grad_norm", "entropy", "kl"):
        assert ra[k] == rb_[k], k
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
