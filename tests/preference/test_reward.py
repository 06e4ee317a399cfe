"""Reward models: scores equal the Hugging Face classifier's, packing changes nothing, accumulation is
exact, ties / margins / rankings reach the loss as specified, and a trained RM beats the length-only
baseline on held-out gold-labeled pairs."""

import json
import math

import pytest
import torch

from posttrain.algorithms.reward import RewardConfig, make_loss_fn, run
from posttrain.config import ModelConfig, load_config
from posttrain.data.batching import collate
from posttrain.data.preference import collate_responses, count_records, encode_pair, encode_ranking
from posttrain.errors import ConfigError, DataError
from posttrain.models.heads import load_reward_model, sequence_rewards
from posttrain.tasks import builtin

BASE = ["train.progress=false", "train.threads=1"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rm(tiny_path, tokenizer):
    torch.manual_seed(0)
    return load_reward_model(ModelConfig(name_or_path=tiny_path), pad_token_id=tokenizer.pad_token_id).eval()


@pytest.fixture(scope="module")
def pair_encs(tokenizer):
    return [encode_pair(tokenizer, r, 256) for r in builtin.gold_preference_records(8, seed=5)]


def test_packed_padded_and_hf_classifier_agree(rm, tokenizer, pair_encs):
    exs = [e.example(k) for e in pair_encs for k in (0, 1)]
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        packed = sequence_rewards(rm, collate(exs, packing=True, pad_id=pad), pad)
        padded_batch = collate(exs, packing=False, pad_id=pad)
        padded = sequence_rewards(rm, padded_batch, pad)
        hf = rm(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]).logits[:, 0]
    assert packed.shape == (16,) and hf.std() > 1e-4  # a real, non-constant head
    assert (packed - hf).abs().max() <= 1e-5
    assert (padded - hf).abs().max() <= 1e-5


def accumulated_grads(model, batches, loss_fn, count_fn):
    """Gradients after backward over every micro-batch with the step's total count (what the engine does)."""
    model.zero_grad()
    total = torch.stack([count_fn(b) for b in batches]).sum()
    for b in batches:
        loss, _ = loss_fn(model, b, total)
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_is_exact(rm, tokenizer, pair_encs):
    cfg = load_config(RewardConfig, None, [])
    loss_fn = make_loss_fn(cfg, tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    grads = [accumulated_grads(rm, [collate_responses(pair_encs[s:s + micro], packing=True,
                                                      pad_id=pad) for s in range(0, 8, micro)], loss_fn, count_records)
             for micro in (8, 2, 3)]  # 3: unequal micro-batches (3, 3, 2) must still weigh pairs equally
    full = grads[0]
    assert max(v.abs().max().item() for v in full.values()) > 1e-4
    for other in grads[1:]:
        assert max((full[n] - other[n]).abs().max().item() for n in full) <= 1e-6


def test_ties_use_target_half_and_margins_are_scaled(rm, tokenizer):
    recs = builtin.gold_preference_records(4, seed=9)
    recs[0]["tie"] = True
    recs[1]["margin"] = 2.0
    recs[0]["margin"] = 5.0  # a tie's margin is ignored (it would shift the tie's optimum)
    encs = [encode_pair(tokenizer, r, 256) for r in recs]
    batch = collate_responses(encs, packing=True, pad_id=tokenizer.pad_token_id)
    cfg = load_config(RewardConfig, None, ["margin_scale=0.5"])
    with torch.no_grad():
        loss, m = make_loss_fn(cfg, tokenizer.pad_token_id)(rm, batch, torch.tensor(4.0))
        r = sequence_rewards(rm, batch, tokenizer.pad_token_id)
    rc, rr = r[:4], r[4:]
    ls = torch.nn.functional.logsigmoid
    d = rc - rr
    expected = torch.stack([-(0.5 * ls(d[0]) + 0.5 * ls(-d[0])), -ls(d[1] - 1.0), -ls(d[2]), -ls(d[3])]).mean()
    assert abs(loss.item() - expected.item()) < 1e-6
    # accuracy counts the 3 strict pairs only: a tie is never a win
    strict = ((d[1:] > 0).float().mean()).item()
    assert abs(m["accuracy"].item() - strict) < 1e-6


def test_ties_are_counted_not_dropped(tmp_path):
    rows = builtin.gold_preference_records(40, seed=3)
    for r in rows[:6]:
        r["tie"] = True
    data = write_jsonl(tmp_path / "ties.jsonl", rows)
    s = run(load_config(RewardConfig, None, BASE + [f"train.output_dir={tmp_path/'run'}", f"data.train={data}",
                                                    "train.max_steps=1", "train.batch_size=8",
                                                    "train.micro_batch_size=8", "eval_holdout=10"]))
    assert s["ties"] == 6 and s["train_records"] == 30
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["ties"] == 6 and "final" in saved and saved["final"]["pairs"] == 10


def rankings(n, seed):
    """K-wise records from the demonstrator, ranked by the gold reward (rank 0 = best)."""
    import random

    rng = random.Random(seed)
    out = []
    for p in builtin._train_problems(n, seed):
        resp = list(dict.fromkeys(builtin.demonstrate(p, rng) for _ in range(6)))[:4]
        if len(resp) < 3:
            continue
        gold = [builtin.gold_reward(p.prompt, r) for r in resp]
        uniq = sorted(set(gold), reverse=True)
        out.append({"prompt": p.prompt, "responses": resp, "ranking": [uniq.index(g) for g in gold]})
    return out


@pytest.mark.parametrize("loss", ["kwise", "plackett_luce"])
def test_rankings_train(tmp_path, loss):
    rows = [r for r in rankings(80, seed=4) if loss == "kwise" or len(set(r["ranking"])) == len(r["ranking"])]
    data = write_jsonl(tmp_path / "rank.jsonl", rows[:40])
    s = run(load_config(RewardConfig, None, BASE + [f"train.output_dir={tmp_path/'run'}", f"data.train={data}",
                                                    f"loss={loss}", "train.max_steps=2", "train.batch_size=8",
                                                    "train.micro_batch_size=4", "eval_holdout=8"]))
    assert s["final"]["pairs"] >= 8 * 3  # every strictly ordered pair of the held-out rankings scored
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r and math.isfinite(r["train/loss"]) for r in rows)


def test_kwise_loss_keeps_a_prompts_pairs_together(rm, tokenizer):
    recs = rankings(6, seed=8)[:3]
    encs = [encode_ranking(tokenizer, r, 256) for r in recs]
    batch = collate_responses(encs, packing=True, pad_id=tokenizer.pad_token_id)
    cfg = load_config(RewardConfig, None, ["loss=kwise"])
    with torch.no_grad():
        loss, _ = make_loss_fn(cfg, tokenizer.pad_token_id)(rm, batch, torch.tensor(3.0))
        r = sequence_rewards(rm, batch, tokenizer.pad_token_id)
    per_prompt = []
    for i, rec in enumerate(recs):  # InstructGPT: mean over the prompt's C(K,2) pairs, then over prompts
        s = batch["slot"][i]
        terms = []
        K = len(rec["responses"])
        for a in range(K):
            for b in range(a + 1, K):
                d = r[s[a]] - r[s[b]]
                ra, rb = rec["ranking"][a], rec["ranking"][b]
                ls = torch.nn.functional.logsigmoid
                terms.append(-(0.5 * ls(d) + 0.5 * ls(-d)) if ra == rb else (-ls(d) if ra < rb else -ls(-d)))
        per_prompt.append(torch.stack(terms).mean())
    assert abs(loss.item() - torch.stack(per_prompt).mean().item()) < 1e-6


def test_bad_configs_and_rows(tmp_path):
    with pytest.raises(ConfigError, match="plackett_luce"):
        load_config(RewardConfig, None, ["loss=plackett"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]},
                                               {"prompt": "p", "responses": ["a", "b"], "ranking": [0]}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: ranking"):
        run(load_config(RewardConfig, None, BASE + [f"data.train={bad}", f"train.output_dir={tmp_path/'r'}",
                                                    "loss=kwise"]))
    good = write_jsonl(tmp_path / "rank.jsonl", rankings(20, seed=1))
    with pytest.raises(ConfigError, match="kwise"):
        run(load_config(RewardConfig, None, BASE + [f"data.train={good}", f"train.output_dir={tmp_path/'r2'}"]))
    assert not (tmp_path / "r2" / "final").exists()


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, heldout_pairs):
    """The RM learning run, shared by the learning, export and eval-reward tests."""
    out = tmp_path_factory.mktemp("rm")
    cfg = load_config(RewardConfig, None, [f"train.output_dir={out}", "train.progress=false",
                                           f"data.eval={heldout_pairs}", "data.max_rows=1200",
                                           "train.epochs=2", "train.log_every=20"])
    return run(cfg)


def test_rm_beats_length_baseline_on_heldout(trained_rm):
    init, final = trained_rm["initial"], trained_rm["final"]
    print(json.dumps({"initial": init, "final": final}))
    assert final["length_baseline"] < 0.6  # the built-in task: length does not predict quality
    assert final["accuracy"] >= final["length_baseline"] + 0.15
    assert final["accuracy"] >= init["accuracy"] + 0.15 and final["margin"] > 0.3
    assert 0 <= final["ece"] <= 1 and final["loss"] < init["loss"]


def test_saved_rm_loads_through_auto_class_with_same_scores(trained_rm, tokenizer):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.reward_model import RewardModelScorer

    final = f"{trained_rm['run_dir']}/final"
    scorer = RewardModelScorer(final)
    recs = builtin.gold_preference_records(6, seed=77)
    prompts = [r["prompt"] for r in recs] * 2
    responses = [r["chosen"] for r in recs] + [r["rejected"] for r in recs]
    ours = torch.tensor(scorer.score(prompts, responses))
    hf_model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    exs = [scorer.encode(p, r) for p, r in zip(prompts, responses)]
    batch = collate(exs, packing=False, pad_id=tokenizer.pad_token_id)  # right-padded, HF computes positions
    with torch.no_grad():
        hf = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    assert ours.std() > 1e-3
    assert (ours - hf).abs().max() <= 1e-5
    # the reward-function contract, and a score does not depend on its batch-mates
    assert scorer(prompts[:1], responses[:1], answer=["x"]) == pytest.approx([float(ours[0])], abs=1e-5)


def test_eval_reward_reports_subsets_and_baselines(trained_rm, tmp_path):
    from posttrain.evaluation.eval_reward import EvalRewardConfig
    from posttrain.evaluation.eval_reward import run as eval_run

    rows = builtin.gold_preference_records(60, seed=55)
    for i, r in enumerate(rows):
        r["subset"] = "sort" if r["prompt"].startswith("Sort") else "reverse"
    rows[0]["tie"] = True
    data = write_jsonl(tmp_path / "bench.jsonl", rows)
    rep = eval_run(load_config(EvalRewardConfig, None, [f"model.name_or_path={trained_rm['run_dir']}/final",
                                                        f"data={data}", f"output_dir={tmp_path/'ev'}"]))
    saved = json.loads((tmp_path / "ev" / "eval_reward.json").read_text())
    assert saved["pairs"] == 59 and saved["ties"] == 1
    assert set(saved["subsets"]) == {"sort", "reverse"}
    assert sum(s["n"] for s in saved["subsets"].values()) == 59
    strict = rows[1:]
    longer = sum((len(r["chosen"]) > len(r["rejected"])) + 0.5 * (len(r["chosen"]) == len(r["rejected"]))
                 for r in strict) / len(strict)
    assert abs(saved["length_baseline"] - longer) < 1e-9
    assert 0 <= saved["ece"] <= 1 and saved["accuracy"] > saved["length_baseline"]
    assert rep["run_dir"] == str(tmp_path / "ev")
    with pytest.raises(ConfigError, match="no evaluation data"):
        load_config(EvalRewardConfig, None, ["model.name_or_path=x"])


def test_eval_reward_refuses_a_model_without_a_trained_head(tiny_path, tmp_path):
    """A causal LM has no reward head: from_pretrained would initialise one at random and eval-reward
    would print a confident table of noise. It stops with one paragraph instead, before the run dir."""
    from pt_helpers import run_cli

    from posttrain.errors import ModelError
    from posttrain.evaluation.eval_reward import EvalRewardConfig
    from posttrain.evaluation.eval_reward import run as eval_run

    data = write_jsonl(tmp_path / "bench.jsonl", builtin.gold_preference_records(4, seed=1))
    args = [f"model.name_or_path={tiny_path}", f"data={data}", f"output_dir={tmp_path / 'ev'}"]
    with pytest.raises(ModelError, match=r"no trained scalar reward head: its `score` weights") as e:
        eval_run(load_config(EvalRewardConfig, None, args))
    assert e.value.where == "model.name_or_path" and "posttrain reward" in e.value.fix
    assert not (tmp_path / "ev").exists()
    out = run_cli("eval-reward", *args, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: model.name_or_path: the model at {tiny_path} has no trained scalar")
    assert "final/" in out.stderr and out.stderr.strip().count("\n") == 0
    assert not (tmp_path / "ev").exists()


def test_lora_reward_model_saves_merged_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rewards.reward_model import RewardModelScorer

    s = run(load_config(RewardConfig, None, BASE + [f"train.output_dir={tmp_path}", "data.max_rows=40",
                                                    "train.max_steps=2", "train.batch_size=8",
                                                    "train.micro_batch_size=8", "lora.enabled=true", "lora.r=4",
                                                    "train.lr=1e-2", "eval_holdout=8"]))
    final = tmp_path / "final"
    assert not (final / "adapter_config.json").exists()  # merged: a plain HF classifier
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    scorer = RewardModelScorer(str(final))
    rec = builtin.gold_preference_records(1, seed=3)[0]
    ex = scorer.encode(rec["prompt"], rec["chosen"])
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ex.input_ids])).logits[0, 0].item()
    assert scorer.score([rec["prompt"]], [rec["chosen"]])[0] == pytest.approx(want, abs=1e-5)
    assert s["final"]["pairs"] == 8
