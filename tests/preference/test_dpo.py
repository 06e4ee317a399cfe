"""DPO family and KTO mechanics: packed log-probs equal padded ones, accumulation is exact, the
reference is computed once and cached (and is the adapter-free model under LoRA), the live and
precomputed references agree, and bad configs fail before anything loads."""

import json

import pytest
import torch

from posttrain.algorithms.dpo import DPOConfig, run
from posttrain.algorithms.kto import KTOConfig, mismatched
from posttrain.algorithms.kto import run as kto_run
from posttrain.config import LoraConfig, ModelConfig, load_config
from posttrain.data.batching import collate
from posttrain.data.preference import (
    batch_records,
    collate_responses,
    count_records,
    encode_pair,
    encode_unpaired,
)
from posttrain.errors import ConfigError, DataError
from posttrain.models import reference as R
from posttrain.models.forward import sequence_logps
from posttrain.models.loading import apply_lora, load_causal_lm
from posttrain.models.preference import make_loss_fn
from posttrain.models.reference import adapters_disabled, compute_logps, precompute
from posttrain.tasks import builtin

FAST = ["train.progress=false", "train.threads=1", "task_eval=false", "data.max_rows=48", "train.batch_size=8",
        "train.micro_batch_size=8", "train.max_steps=1"]


@pytest.fixture(scope="module")
def encs(tokenizer):
    return [encode_pair(tokenizer, r, 256) for r in builtin.gold_preference_records(8, seed=5)]


def test_packed_and_padded_sequence_logps_agree(tiny_model, tokenizer, encs):
    pad = tokenizer.pad_token_id
    exs = [e.example(k) for e in encs for k in (0, 1)]
    with torch.no_grad():
        packed, n_p = sequence_logps(tiny_model, collate(exs, packing=True, pad_id=pad))
        padded, n_d = sequence_logps(tiny_model, collate(exs, packing=False, pad_id=pad))
        alone = torch.stack([sequence_logps(tiny_model, collate([e], packing=False, pad_id=pad))[0][0] for e in exs])
    assert torch.equal(n_p, n_d) and n_p.tolist() == [sum(e.loss_mask) - 0 for e in exs]
    assert (packed - alone).abs().max() <= 1e-5 and (padded - alone).abs().max() <= 1e-5
    # and against a plain full log_softmax over the vocabulary (the slow reference)
    e = exs[3]
    ids = torch.tensor([e.input_ids])
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(e.loss_mask[1:], dtype=torch.bool)
    assert abs(lp[mask].sum().item() - alone[3].item()) <= 1e-5


def test_shared_prompt_layout_equals_separate_sequences(tiny_path, tiny_model, tokenizer, encs):
    """The prompt computed once for both responses gives the same log-probs and reward-head scores as
    chosen and rejected run as separate sequences (and fewer tokens)."""
    from posttrain.data.preference import collate_shared
    from posttrain.models.heads import load_reward_model, sequence_rewards

    pad = tokenizer.pad_token_id
    shared = collate_shared(encs, pad_id=pad)
    separate = collate_responses(encs, packing=True, pad_id=pad)
    assert int((shared["seq_index"] != -1).sum()) < int((separate["seq_index"] != -1).sum())
    with torch.no_grad():
        a, na = sequence_logps(tiny_model, shared)
        b, nb = sequence_logps(tiny_model, separate)
        torch.manual_seed(0)
        rm = load_reward_model(ModelConfig(name_or_path=tiny_path), pad_token_id=pad)
        ra, rb = sequence_rewards(rm, shared, pad), sequence_rewards(rm, separate, pad)
    assert torch.equal(na, nb)
    assert (a - b).abs().max() <= 1e-5 and (ra - rb).abs().max() <= 1e-5


def grads(model, batches, loss_fn):
    model.zero_grad()
    total = torch.stack([count_records(b) for b in batches]).sum()
    for b in batches:
        loss_fn(model, b, total)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_accumulation_is_exact(tiny_model, tokenizer, encs, loss):
    pad = tokenizer.pad_token_id
    ref = torch.randn(8, 2) - 20  # any fixed reference log-probs
    fn = make_loss_fn(loss, 2.0 if loss == "simpo" else 0.1, {})

    def batches(micro):
        out = []
        for s in range(0, 8, micro):
            b = batch_records(encs[s:s + micro], shared_prompt=loss != "ipo", packing=True,
                              pad_id=pad)
            b["ref"] = ref[s:s + micro]
            out.append(b)
        return out

    full, split = grads(tiny_model, batches(8), fn), grads(tiny_model, batches(3), fn)
    scale = max(v.abs().max().item() for v in full.values())
    assert scale > 1e-5
    assert max((full[n] - split[n]).abs().max().item() for n in full) <= 1e-6 * max(scale, 1.0)


def test_reference_cache_is_reused_without_loading(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = FAST + [f"ref_cache_dir={cache}", "eval_holdout=8"]
    first = run(load_config(DPOConfig, None, args + [f"train.output_dir={tmp_path/'a'}"]))
    assert first["reference_cache"]["cache"] == "miss" and first["reference_cache"]["loaded_reference"]
    assert len(list(cache.iterdir())) == 1

    def no_load(*a, **k):
        raise AssertionError("the reference model was loaded although its log-probs are cached")

    monkeypatch.setattr(R, "load_reference", no_load)
    second = run(load_config(DPOConfig, None, args + [f"train.output_dir={tmp_path/'b'}"]))
    assert second["reference_cache"]["cache"] == "hit" and not second["reference_cache"]["loaded_reference"]
    assert second["final"]["loss"] == pytest.approx(first["final"]["loss"], abs=1e-6)
    # other data -> another key (and here: a load, which the patch forbids)
    with pytest.raises(AssertionError, match="cached"):
        run(load_config(DPOConfig, None, args + [f"train.output_dir={tmp_path/'c'}", "data.max_rows=40"]))


def test_lora_reference_is_the_base_model(tiny_path, tokenizer, encs, tmp_path):
    base = load_causal_lm(ModelConfig(name_or_path=tiny_path))
    policy = apply_lora(load_causal_lm(ModelConfig(name_or_path=tiny_path)),
                        LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # adapters that change the model
    exs = [e.example(k) for e in encs for k in (0, 1)]
    pad = tokenizer.pad_token_id
    want = compute_logps(base, exs, pad_id=pad)
    with adapters_disabled(policy) as ref:
        got = compute_logps(ref, exs, pad_id=pad)
    adapted = compute_logps(policy, exs, pad_id=pad)
    assert (got - want).abs().max() <= 1e-5
    assert (adapted - want).abs().max() > 1e-2  # adapters are back on after the context
    logps, info = precompute(exs, ref_path=tiny_path, model_cfg=ModelConfig(name_or_path=tiny_path),
                               policy=policy, cache_dir=tmp_path, pad_id=pad)
    assert not info["loaded_reference"] and (logps - want).abs().max() <= 1e-5


def test_live_reference_matches_precomputed(tmp_path):
    args = FAST + ["train.log_every=1", "eval_holdout=8"]
    pre = run(load_config(DPOConfig, None, args + [f"train.output_dir={tmp_path/'p'}", f"ref_cache_dir={tmp_path}"]))
    live = run(load_config(DPOConfig, None, args + [f"train.output_dir={tmp_path/'l'}", "reference=live"]))
    rows = [[json.loads(r) for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "pl"]
    step1 = [next(r for r in rs if r["step"] == 1) for rs in rows]
    assert step1[0]["train/loss"] == pytest.approx(step1[1]["train/loss"], abs=1e-5)
    assert pre["final"]["rewards/margin"] == pytest.approx(live["final"]["rewards/margin"], abs=1e-4)


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cdpo", "robust", "hinge"])
def test_every_paired_loss_trains(tmp_path, loss):
    args = FAST + [f"train.output_dir={tmp_path}", f"loss={loss}", "eval_holdout=8", f"ref_cache_dir={tmp_path/'c'}",
                   "train.max_steps=2", "train.log_every=1"]
    s = run(load_config(DPOConfig, None, args + (["beta=2.0"] if loss == "simpo" else [])))
    free = loss in ("simpo", "orpo")
    assert (s["reference"] == "none") == free and (s["reference_cache"]["cache"] == "none") == free
    row = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
                "logps/chosen", "logps/rejected"):
        assert f"train/{key}" in row
    assert "rewards/accuracy" in s["final"]


def test_kto_unpairs_and_mismatches(tokenizer):
    from posttrain.data.preference import unpair

    pairs = builtin.gold_preference_records(10, seed=1)
    rows = unpair(pairs + [{**pairs[0], "tie": True}])
    assert len(rows) == 20 and [r["label"] for r in rows[:2]] == [True, False]
    encs = [encode_unpaired(tokenizer, r, 256) for r in rows]
    kl = mismatched(encs, seed=0)
    for e, k in zip(encs, kl):
        assert k.input_ids[:len(e.prompt_ids)] == e.prompt_ids  # same prompt ...
        assert k.input_ids[len(e.prompt_ids):] != e.responses[0]  # ... someone else's completion


def test_kto_runs_on_unpaired_records(tmp_path):
    rows = []
    for r in builtin.gold_preference_records(24, seed=6):
        rows += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                 {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = kto_run(load_config(KTOConfig, None, FAST + [f"data.train={data}", f"train.output_dir={tmp_path/'k'}",
                                                     f"ref_cache_dir={tmp_path/'c'}", "train.log_every=1"]))
    assert s["desirable"] == s["undesirable"] == 24 and s["weighted_balance"] == 1.0
    row = [json.loads(r) for r in (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()][1]
    assert row["train/kl"] >= 0 and "train/rewards/chosen" in row


def test_bad_configs_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown loss 'dpp'.*did you mean 'dpo'.*dpo, cdpo, robust, ipo, "
                                          r"hinge, simpo, orpo"):
        load_config(DPOConfig, None, ["loss=dpp"])
    with pytest.raises(ConfigError, match="uses no reference"):
        load_config(DPOConfig, None, ["loss=simpo", "reference=live"])
    with pytest.raises(ConfigError, match="needs reference log-probs"):
        load_config(DPOConfig, None, ["loss=dpo", "reference=none"])
    with pytest.raises(ConfigError, match=r"takes no hyper-parameter 'gamma'.*label_smoothing"):
        load_config(DPOConfig, None, ["loss=cdpo", "loss_args={gamma: 1.0}"])
    with pytest.raises(ConfigError, match="beta must be positive"):
        load_config(DPOConfig, None, ["beta=0"])
    with pytest.raises(ConfigError, match="desirable_weight"):
        load_config(KTOConfig, None, ["desirable_weight=0"])
    ranks = tmp_path / "ranks.jsonl"
    ranks.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}) + "\n")
    with pytest.raises(DataError, match="K-wise"):
        run(load_config(DPOConfig, None, FAST + [f"data.train={ranks}", f"train.output_dir={tmp_path/'x'}"]))
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "p", "completion": "a", "label": True}) + "\n")
    with pytest.raises(DataError, match="only one label"):
        kto_run(load_config(KTOConfig, None, FAST + [f"data.train={one}", f"train.output_dir={tmp_path/'y'}"]))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- learning on the built-in task

LEARN = ["train.progress=false", "data.max_rows=960", "train.max_steps=30", "train.log_every=10",
         "task_eval_prompts=64", "task_eval_samples=4"]


def check_learned(s, min_reward_acc=0.75):
    """Gold reward and exact accuracy of samples rise over the SFT model's; the implicit reward orders
    held-out pairs; KL to the reference is reported, positive and moderate. A sign-flipped loss learns
    to prefer the rejected responses: its implicit-reward accuracy falls below 0.5 and gold drops."""
    before, after = s["initial"], s["final"]
    keys = ("gold_reward", "accuracy", "rewards/accuracy", "logps/accuracy", "kl", "response_chars")
    print(json.dumps({"initial": {k: before.get(k) for k in keys}, "final": {k: after.get(k) for k in keys}}))
    assert after["rewards/accuracy"] >= min_reward_acc
    assert after["gold_reward"] >= before["gold_reward"] + 0.01, (before["gold_reward"], after["gold_reward"])
    assert after["accuracy"] >= before["accuracy"] + 0.02, (before["accuracy"], after["accuracy"])
    assert before["kl"] == 0.0 and 0.005 < after["kl"] < 3.0 and after["kl_se"] > 0


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refcache")  # DPO and IPO share the reference pass (same model, same data)


@pytest.mark.slow
def test_dpo_improves_gold_over_sft(sft_dir, heldout_pairs, ref_cache, tmp_path):
    s = run(load_config(DPOConfig, None, LEARN + [
        f"model.name_or_path={sft_dir}", f"data.eval={heldout_pairs}", f"train.output_dir={tmp_path}",
        f"ref_cache_dir={ref_cache}", "loss=dpo", "beta=0.1", "train.lr=1e-5", "nll_weight=1.0"]))
    check_learned(s)
    assert s["final"]["logps/accuracy"] >= s["initial"]["logps/accuracy"]


@pytest.mark.slow
def test_ipo_improves_gold_over_sft(sft_dir, heldout_pairs, ref_cache, tmp_path):
    s = run(load_config(DPOConfig, None, LEARN + [
        f"model.name_or_path={sft_dir}", f"data.eval={heldout_pairs}", f"train.output_dir={tmp_path}",
        f"ref_cache_dir={ref_cache}", "loss=ipo", "beta=0.5", "train.lr=1e-5", "nll_weight=1.0"]))
    check_learned(s)


@pytest.mark.slow
def test_kto_improves_gold_over_sft(sft_dir, heldout_pairs, tmp_path):
    s = kto_run(load_config(KTOConfig, None, LEARN + [
        f"model.name_or_path={sft_dir}", f"data.eval={heldout_pairs}", f"train.output_dir={tmp_path}",
        f"ref_cache_dir={tmp_path / 'cache'}", "beta=0.1", "train.lr=1e-5", "nll_weight=1.0"]))
    check_learned(s, min_reward_acc=0.7)
    assert s["desirable"] == s["undesirable"]


def test_lora_dpo_run_never_loads_a_reference(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("LoRA must use the adapter-free policy as its reference")

    monkeypatch.setattr(R, "load_reference", no_load)
    args = FAST + [f"train.output_dir={tmp_path}", f"ref_cache_dir={tmp_path/'c'}", "eval_holdout=8",
                   "lora.enabled=true", "lora.r=4", "train.lr=1e-3"]
    s = run(load_config(DPOConfig, None, args))
    assert s["reference_cache"]["cache"] == "miss" and not s["reference_cache"]["loaded_reference"]
    assert (tmp_path / "final" / "adapter_config.json").exists()
    live = run(load_config(DPOConfig, None, args + ["reference=live", f"train.output_dir={tmp_path/'live'}"]))
    assert live["final"]["loss"] == pytest.approx(s["final"]["loss"], abs=1e-4)
