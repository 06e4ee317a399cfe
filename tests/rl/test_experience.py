"""Engine logic of online RL with fakes: batch-size derivation, reward combination with None,
truncation policies, dynamic sampling, packed log-probs, minibatches, exact accumulation."""

import math
from dataclasses import replace

import pytest
import torch

from posttrain.config import load_config
from posttrain.engines.rollout import Rollout, engine_dtype
from posttrain.errors import ConfigError, DataError
from posttrain.models import forward as model_forward
from posttrain.models.forward import to_layout, token_forward
from posttrain.rewards.builtin import builtin_correct, builtin_gold
from posttrain.rewards.combine import check_reward_config, combine_rewards
from posttrain.rollouts.config import RLTrainConfig, RolloutConfig, ShapingConfig, plan_batches
from posttrain.rollouts.experience import Experience, ExperienceMaker, fill_invalid, minibatches
from posttrain.rollouts.metrics import group_std_zero_frac
from posttrain.rollouts.online import pg_recipe

# ----------------------------------------------------------------------------- fakes


class ScriptedEngine:
    """A rollout engine that returns scripted completions: ``script(prompt_index, sample_index)`` ->
    (completion ids, finish reason). Log-probs are -1 per token."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.seed))
        out = []
        for p in prompts:
            for k in range(params.n):
                ids, reason = self.script(p, k)
                out.append(Rollout(list(p), list(ids), [-1.0] * len(ids), reason))
        return out

    def update_weights(self, model):
        pass


def make_maker(tokenizer, engine, rewards, *, G=2, P=3, shaping=None, records=None, max_new=8):
    ro = RolloutConfig(prompts_per_step=P, group_size=G, max_new_tokens=max_new)
    records = records or [{"prompt": f"Sort the numbers {i} 1 2.", "answer": str(i)} for i in range(12)]
    plan = plan_batches(ro, RLTrainConfig())
    return ExperienceMaker(tokenizer=tokenizer, engine=engine, rollout=ro,
                           shaping=shaping or ShapingConfig(overlong_buffer=0), rewards=rewards,
                           records=records, seed=0, plan=plan)


# ----------------------------------------------------------------------------- batch sizes


def test_engine_dtype_choice(tiny_model):
    """auto: bf16 for an fp32 model on a CPU with native bf16 matmuls, else the model's dtype."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert engine_dtype("auto", tiny_model) == (torch.bfloat16 if native else None)
    assert engine_dtype("model", tiny_model) is None
    assert engine_dtype("bfloat16", tiny_model) is torch.bfloat16
    with pytest.raises(ConfigError, match="tis_cap"):
        load_config(RolloutConfig, None, ["tis_cap=0"])


def test_plan_batches_derives_sizes():
    ro = RolloutConfig(prompts_per_step=8, group_size=4)
    p = plan_batches(ro, RLTrainConfig())
    assert (p.rollouts, p.minibatches, p.micro) == (32, 1, 32)
    p = plan_batches(ro, RLTrainConfig(batch_size=8, micro_batch_size=4))
    assert (p.rollouts, p.minibatches, p.micro) == (32, 4, 4)
    p = plan_batches(ro, RLTrainConfig(batch_size=16), world=2)
    assert (p.prompts_per_process, p.rollouts, p.minibatches, p.micro) == (4, 16, 2, 8)


def test_plan_batches_errors_name_values_that_work():
    ro = RolloutConfig(prompts_per_step=3, group_size=4)
    with pytest.raises(ConfigError) as e:
        plan_batches(ro, RLTrainConfig(batch_size=5))
    assert "[1, 2, 3, 4, 6, 12]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        plan_batches(ro, RLTrainConfig(batch_size=6, micro_batch_size=4))
    assert "[1, 2, 3, 6]" in str(e.value)
    with pytest.raises(ConfigError, match="multiple of 2"):
        plan_batches(ro, RLTrainConfig(), world=2)


# ----------------------------------------------------------------------------- rewards


def test_combine_rewards_none_means_does_not_apply():
    total, valid = combine_rewards({"a": [1.0, None, None], "b": [0.5, 2.0, None]}, {"a": 2.0, "b": 1.0})
    assert total.tolist() == [2.5, 2.0, 0.0]
    assert valid.tolist() == [True, True, False]
    with pytest.raises(DataError, match="returned nan"):
        combine_rewards({"a": [float("nan")]}, {"a": 1.0})
    with pytest.raises(DataError, match="returned 1 values for 2"):
        combine_rewards({"a": [1.0, 2.0], "b": [1.0]}, {"a": 1.0, "b": 1.0})


def test_builtin_rewards():
    p = ["Sort the numbers 3 1 2."] * 3
    assert builtin_correct(p, ["1 2 3", "Sure! 1 2 3", "3 1 2"]) == [1.0, 1.0, 0.0]
    gold = builtin_gold(p, ["1 2 3", "Sure! 1 2 3", "3 1 2"])
    assert gold[0] == 1.0 and abs(gold[1] - 0.7) < 1e-9 and gold[2] < 0.5
    msgs = [[{"role": "user", "content": "Reverse the numbers 1 2."}]]
    assert builtin_correct(msgs, ["2 1"]) == [1.0]


def test_reward_weights_must_match():
    with pytest.raises(ConfigError, match="2 reward_weights for 1 rewards"):
        check_reward_config(["builtin_correct"], [1.0, 2.0])


# ----------------------------------------------------------------------------- experience


def _ids(tokenizer, text, eos=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def test_truncation_policies(tokenizer):
    # sample 0 of every prompt finishes with "1", sample 1 is cut off at the budget
    def script(p, k):
        return (_ids(tokenizer, "1"), "stop") if k == 0 else (_ids(tokenizer, "1 2 3 4", eos=False), "length")

    ones = lambda prompts, completions, **kw: [1.0] * len(prompts)  # noqa: E731
    for policy, scores, valid in [("score", [1.0, 1.0], [True, True]),
                                  ("penalize", [1.0, -0.5], [True, True]),
                                  ("mask", [1.0, 1.0], [True, False])]:
        shaping = ShapingConfig(truncated=policy, truncation_penalty=-0.5, overlong_buffer=0)
        maker = make_maker(tokenizer, ScriptedEngine(script), [("ones", ones, 1.0)], shaping=shaping)
        exp = maker.make(0, need_old=False)
        assert exp.scores.view(-1, 2)[0].tolist() == scores, policy
        assert exp.valid.view(-1, 2)[0].tolist() == valid, policy
        # a masked rollout has no trained tokens; the others train every completion token
        assert exp.mask.sum(1).view(-1, 2)[0, 1].item() == (0 if policy == "mask" else exp.lengths[1].item())
        assert exp.metrics["response/truncated_frac"] == 0.5


def test_none_reward_leaves_sample_out_of_loss(tokenizer):
    script = lambda p, k: (_ids(tokenizer, str(k)), "stop")  # noqa: E731
    half = lambda prompts, completions, **kw: [None if c == "1" else 1.0 for c in completions]  # noqa: E731
    exp = make_maker(tokenizer, ScriptedEngine(script), [("half", half, 1.0)]).make(0, need_old=False)
    assert exp.valid.view(-1, 2)[:, 1].tolist() == [False] * 3
    assert (exp.mask.view(3, 2, -1)[:, 1] == 0).all()
    assert math.isnan(exp.components["half"][1])
    assert exp.metrics["response/invalid_frac"] == 0.5
    # the filled reward does not move the group baseline
    filled = fill_invalid(torch.tensor([1.0, 0.0, 3.0, 0.0]), torch.tensor([True, False, True, True]), 2)
    assert filled.tolist() == [1.0, 1.0, 3.0, 0.0]


def test_reward_columns_and_overlong_penalty(tokenizer):
    seen = {}

    def reward(prompts, completions, answer, **kw):
        seen["answer"] = list(answer)
        return [0.0] * len(prompts)

    lengths = {0: 2, 1: 8}
    script = lambda p, k: ([5] * (lengths[k] - 1) + [tokenizer.eos_token_id], "stop")  # noqa: E731
    shaping = ShapingConfig(overlong_buffer=4, overlong_penalty=0.5)
    exp = make_maker(tokenizer, ScriptedEngine(script), [("r", reward, 1.0)], shaping=shaping).make(0, need_old=False)
    assert len(seen["answer"]) == 6 and seen["answer"][0] == seen["answer"][1]  # repeated per group
    # length 2 <= 8 - 4: no penalty; length 8 = L_max: the ramp's end, -1 x 0.5
    assert exp.scores.view(-1, 2)[0].tolist() == [0.0, -0.5]
    assert exp.components["overlong"].view(-1, 2)[0].tolist() == [0.0, -0.5]


def test_dynamic_sampling_drops_and_refills(tokenizer):
    # prompts whose index in the record list is even get equal rewards in their group (zero variance)
    def script(p, k):
        return (_ids(tokenizer, str(k)), "stop")

    def reward(prompts, completions, answer, **kw):
        return [1.0 if int(a) % 2 == 0 else float(c == "0") for a, c in zip(answer, completions)]

    engine = ScriptedEngine(script)
    maker = make_maker(tokenizer, engine, [("r", reward, 1.0)], P=3)
    exp = maker.make(0, need_old=False, dynamic_sampling=True, max_rounds=5)
    groups = exp.scores.view(-1, 2)
    assert len(groups) <= 3 and len(groups) >= 1
    assert ((groups[:, 0] - groups[:, 1]).abs() > 0).all()  # only informative groups kept
    assert exp.metrics["dynamic/sampled_groups"] >= exp.metrics["dynamic/kept_groups"] == len(groups)
    assert 0 <= exp.metrics["reward/std_zero_frac"] <= 1
    kept = exp.metrics["dynamic/kept_groups"]
    if kept < 3:  # refilled from extra rounds until the rounds ran out
        assert len(engine.calls) == 5
    # without dynamic sampling every group stays and one round runs
    engine2 = ScriptedEngine(script)
    exp2 = make_maker(tokenizer, engine2, [("r", reward, 1.0)], P=3).make(0, need_old=False)
    assert len(exp2) == 6 and len(engine2.calls) == 1


def test_group_std_zero_frac():
    s = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert group_std_zero_frac(s, 2).item() == pytest.approx(2 / 3)


def test_prompt_batches_are_a_function_of_step(tokenizer):
    script = lambda p, k: (_ids(tokenizer, "1"), "stop")  # noqa: E731
    ones = lambda prompts, completions, **kw: [1.0] * len(prompts)  # noqa: E731
    a = make_maker(tokenizer, ScriptedEngine(script), [("o", ones, 1.0)])
    b = make_maker(tokenizer, ScriptedEngine(script), [("o", ones, 1.0)])
    assert a.prompt_indices(5) == b.prompt_indices(5) and a.prompt_indices(5) != a.prompt_indices(6)
    assert a.prompt_indices(3, 1) == b.prompt_indices(3, 1)


def test_prompt_too_long_is_an_error(tokenizer):
    with pytest.raises(DataError, match="max_prompt_tokens"):
        ro = RolloutConfig(prompts_per_step=1, group_size=2, max_prompt_tokens=4)
        ExperienceMaker(tokenizer=tokenizer, engine=None, rollout=ro, shaping=ShapingConfig(),
                           rewards=[], records=[{"prompt": "Sort the numbers 1 2 3."}], seed=0,
                           plan=plan_batches(ro, RLTrainConfig()))


# ----------------------------------------------------------------------------- packed forwards


def _reference_logps(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return lp[len(prompt) - 1:]


def test_packed_completion_logps_match_unpacked(tokenizer, tiny_model):
    prompts = [[1, 5, 9, 12], [1, 7], [3, 4, 5, 6, 7, 8]]
    comps = [[20, 21, 22], [30], [40, 41, 42, 43, 44]]
    exp = Experience(prompts=["p"] * 3, prompt_ids=prompts, completion_ids=comps, texts=[""] * 3,
                     finish=["stop"] * 3, group_size=1, scores=torch.zeros(3), valid=torch.ones(3, dtype=torch.bool),
                     components={}, mask=torch.zeros(3, 5), rollout_logp=torch.zeros(3, 5))
    for temperature in (1.0, 0.7):
        mb = exp.micro_batch([0, 1, 2])
        # packed in one row; a completion's last token is a target only, never an input
        assert mb["input_ids"].shape == (1, 4 + 2 + 2 + 0 + 6 + 4 + int(mb["n_pad"]))
        out = token_forward(tiny_model, mb, temperature)
        got = to_layout(out["logp"], out["seq"], out["j"], 3, 5)
        for i in range(3):
            ref = _reference_logps(tiny_model, prompts[i], comps[i], temperature)
            assert torch.allclose(got[i, :len(comps[i])], ref, atol=1e-5)
            assert (got[i, len(comps[i]):] == 0).all()


def test_shared_prompt_layout_matches_separate_sequences(tokenizer, tiny_model):
    """A group's prompt is computed once (completions branch off it); log-probs equal running each
    rollout alone, and the batch holds fewer tokens."""
    prompts = [[1, 5, 9, 12, 13]] * 3 + [[3, 4]] + [[1, 5, 9, 12, 13]]
    comps = [[20, 21, 22], [30], [40, 41, 42, 43], [50, 51], [60, 61]]
    exp = Experience(prompts=["p"] * 5, prompt_ids=prompts, completion_ids=comps, texts=[""] * 5,
                     finish=["stop"] * 5, group_size=1, scores=torch.zeros(5),
                     valid=torch.ones(5, dtype=torch.bool), components={}, mask=torch.zeros(5, 4),
                     rollout_logp=torch.zeros(5, 4))
    mb = exp.micro_batch([0, 1, 2, 3, 4])
    # three trees: P + Σ(C − 1) each (the last rollout starts a new one)
    assert mb["input_ids"].numel() - int(mb["n_pad"]) == 5 + 5 + 2 + 1 + 5 + 1
    out = token_forward(tiny_model, mb, want_hidden=True)
    got = to_layout(out["logp"], out["seq"], out["j"], 5, 4)
    for i in range(5):
        ref = _reference_logps(tiny_model, prompts[i], comps[i])
        assert torch.allclose(got[i, :len(comps[i])], ref, atol=1e-5), i


def test_head_slice_matches_full_forward(tokenizer, tiny_model, monkeypatch):
    exp = Experience(prompts=["p"] * 2, prompt_ids=[[1, 2, 3], [4, 5]], completion_ids=[[6, 7], [8, 9, 10]],
                     texts=[""] * 2, finish=["stop"] * 2, group_size=1, scores=torch.zeros(2),
                     valid=torch.ones(2, dtype=torch.bool), components={}, mask=torch.zeros(2, 3),
                     rollout_logp=torch.zeros(2, 3))
    mb = exp.micro_batch([0, 1])
    fast = token_forward(tiny_model, mb, want_hidden=True)
    monkeypatch.setattr(model_forward, "_HEAD_SLICE_ARCHS", ())
    slow = token_forward(tiny_model, mb, want_hidden=True)
    assert torch.allclose(fast["logp"], slow["logp"], atol=1e-5)
    assert torch.allclose(fast["hidden"], slow["hidden"], atol=1e-5)


# ----------------------------------------------------------------------------- minibatches and the loss


def test_minibatches_cover_each_rollout_once_per_epoch():
    steps = list(minibatches(10, 3, 2, micro=2, seed=0))
    assert len(steps) == 6
    for epoch in (0, 1):
        idx = sorted(i for e, mbs in steps if e == epoch for mb in mbs for i in mb)
        assert idx == list(range(10))
    assert all(len(m) <= 2 for _, mbs in steps for m in mbs)
    # one update per batch: no shuffle, one minibatch
    assert list(minibatches(4, 1, 1, micro=4, seed=0)) == [(0, [[0, 1, 2, 3]])]
    # groups move as units, so a group's shared prompt stays together
    for _, mbs in minibatches(12, 3, 2, micro=4, seed=1, group_size=4):
        for mb in mbs:
            assert mb[0] % 4 == 0 and mb == list(range(mb[0], mb[0] + 4))


def _grpo_cfg(*overrides):
    from posttrain.algorithms.grpo import GRPOConfig

    return load_config(GRPOConfig, None, list(overrides))


def _fake_experience(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [[1, 5, 9, int(torch.randint(10, 100, (1,), generator=g))] for _ in range(n)]
    comps = [torch.randint(10, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    T = max(map(len, comps))
    mask = torch.zeros(n, T)
    for i, c in enumerate(comps):
        mask[i, :len(c)] = 1
    adv = torch.randn(n, generator=g)
    return Experience(prompts=["p"] * n, prompt_ids=prompts, completion_ids=comps, texts=[""] * n,
                      finish=["stop"] * n, group_size=2, scores=adv, valid=torch.ones(n, dtype=torch.bool),
                      components={}, mask=mask, rollout_logp=torch.zeros(n, T),
                      ref_logp=-torch.rand(n, T, generator=g) * 3, advantages=adv[:, None] * mask)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo", "gspo", "cispo"])
def test_accumulation_is_exact(variant, tiny_model):
    """Σ over micro-batches of loss · count/total gives the gradient of one big batch."""
    from posttrain.algorithms.grpo import make_loss
    from posttrain.kl import FixedKLController

    cfg = _grpo_cfg(f"variant={variant}", "kl.beta=0.1")
    loss_fn, count_fn = make_loss(replace(pg_recipe(cfg), max_len=8), FixedKLController(0.1))
    exp = _fake_experience()

    def grads(micro_lists):
        tiny_model.zero_grad()
        mbs = [exp.micro_batch(idx) for idx in micro_lists]
        total = torch.stack([count_fn(mb) for mb in mbs]).sum()
        for mb in mbs:
            loss, _ = loss_fn(tiny_model, mb, total)
            loss.backward()
        return torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])

    one = grads([list(range(8))])
    four = grads([[0, 1], [2, 3], [4, 5], [6, 7]])
    assert one.abs().sum() > 0
    assert torch.allclose(one, four, atol=1e-5 * one.abs().max(), rtol=1e-4)


def test_policy_gradient_raises_logp_of_positive_advantage(tiny_model):
    """One optimizer step on the GRPO loss moves log π of A > 0 completions up and of A < 0 down
    (a sign-flipped loss fails this)."""
    from posttrain.algorithms.grpo import make_loss
    from posttrain.kl import FixedKLController

    cfg = _grpo_cfg("kl.beta=0")
    loss_fn, count_fn = make_loss(replace(pg_recipe(cfg), max_len=8), FixedKLController(0.0))
    exp = _fake_experience()
    exp.ref_logp = None
    mb = exp.micro_batch(list(range(8)))

    def seq_logp():
        with torch.no_grad():
            out = token_forward(tiny_model, mb)
            return (to_layout(out["logp"], out["seq"], out["j"], 8, exp.mask.shape[1]) * exp.mask).sum(1)

    before = seq_logp()
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.02)
    loss, _ = loss_fn(tiny_model, mb, count_fn(mb))
    loss.backward()
    opt.step()
    delta = seq_logp() - before
    adv = exp.scores
    assert (delta[adv > 0].mean() > 0) and (delta[adv < 0].mean() < 0)
    assert torch.corrcoef(torch.stack([delta, adv]))[0, 1] > 0.5


# ----------------------------------------------------------------------------- variants and configs


def test_variants_pick_their_defaults():
    c = _grpo_cfg("variant=dapo")
    assert (c.loss.aggregation, c.loss.clip_low, c.loss.clip_high, c.dynamic_sampling) == ("token_mean", 0.2, 0.28, True)
    assert c.shaping.overlong_buffer == 6 and c.kl.beta == 0.0
    c = _grpo_cfg("variant=dr_grpo")
    assert (c.loss.advantage, c.loss.aggregation) == ("group_mean", "seq_mean_token_sum_norm")
    c = _grpo_cfg("variant=gspo")
    assert c.loss.policy_loss == "gspo" and c.loss.clip_high == 4e-4
    c = _grpo_cfg()
    assert (c.loss.policy_loss, c.loss.advantage, c.kl.beta, c.kl.placement) == ("ppo", "group_std", 0.04, "loss")
    c = _grpo_cfg("variant=dapo", "loss.clip_high=0.3", "dynamic_sampling=false")  # explicit values win
    assert c.loss.clip_high == 0.3 and c.dynamic_sampling is False
    with pytest.raises(ConfigError, match="group_size >= 2"):
        _grpo_cfg("rollout.group_size=1")
    with pytest.raises(ConfigError, match="seq_mean_token_mean"):
        _grpo_cfg("variant=gspo", "loss.aggregation=token_mean")


def test_rloo_and_reinforce_configs():
    from posttrain.algorithms.reinforce import ReinforceConfig
    from posttrain.algorithms.rloo import RLOOConfig

    r = load_config(RLOOConfig, None, [])
    assert (r.loss.advantage, r.kl.placement, r.kl.estimator, r.kl.beta) == ("rloo", "reward", "k1", 0.05)
    s = load_config(ReinforceConfig, None, [])
    assert (s.loss.advantage, s.rollout.group_size) == ("batch_mean", 1)


def test_advantage_registry_identities():
    from posttrain.algorithms.grpo import _advantage_registry

    reg = _advantage_registry()
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 4.0, 6.0])
    # Dr.GRPO x G/(G-1) = RLOO (rlhf-book ch. 6)
    assert torch.allclose(reg["group_mean"](r, 4) * 4 / 3, reg["rloo"](r, 4))
    assert torch.allclose(reg["batch_mean"](r, 1), r - r.mean())
    g = reg["group_std"](r, 4).view(2, 4)
    assert torch.allclose(g.mean(1), torch.zeros(2), atol=1e-6)
