"""Constitutional AI: chain logic on a scripted policy, and the whole command on the tiny model."""

import json
import random
import re

from posttrain.config import load_config
from posttrain.judges.cai import ai_preference_pairs, critique_revision_chains
from posttrain.judges.commands import CAIConfig, run_cai
from posttrain.judges.constitution import DEFAULT_CONSTITUTION, Principle, load_constitution

PRINCIPLES = [Principle("p1", "CRITIQUE-1?", "REVISE-1!", "Which is kinder?"),
              Principle("p2", "CRITIQUE-2?", "REVISE-2!")]


class ScriptedPolicy:
    """Drafts, critiques and revises by rule, recording every conversation it is shown."""

    name = "policy"

    def __init__(self):
        self.seen = []

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        out = []
        for m in messages_list:
            self.seen.append(m)
            last = m[-1]["content"]
            if last.startswith("CRITIQUE"):
                out.append(f"critique of <{m[-2]['content']}>")
            elif last.startswith("REVISE"):
                out.append(f"revised <{m[-4]['content']}>")  # the reply the critique was about
            else:
                out.append(f"draft for {last}")
        return out


def test_chains_carry_the_conversation_and_draw_principles():
    policy = ScriptedPolicy()
    chains = critique_revision_chains(policy, ["q1", "q2"], PRINCIPLES, rounds=2, rng=random.Random(0))
    assert len(policy.seen) == 2 * (1 + 2 * 2)
    c = chains[0]
    assert c.initial == "draft for q1"
    assert c.critiques[0] == "critique of <draft for q1>"
    assert c.revisions == ["revised <draft for q1>", "revised <revised <draft for q1>>"]
    assert sorted(c.principles) == ["p1", "p2"]  # two rounds, drawn without replacement
    # the last revision request saw the whole conversation: prompt, draft, both rounds
    last = policy.seen[-2]  # q1's final revision request (calls are batched by prompt order)
    assert [m["role"] for m in last] == ["user", "assistant"] + ["user", "assistant"] * 3 + ["user"]
    assert last[0]["content"] == "q1" and last[3]["content"] == c.critiques[0]
    record = c.sft_record()
    assert record["completion"] == c.revisions[-1] and record["critiques"] == c.critiques
    assert record["principles"] == c.principles and record["prompt"] == "q1"


class Judge:
    def __init__(self, rule):
        self.rule, self.name, self.prompts = rule, "judge", []

    def complete(self, messages_list, max_tokens=256, temperature=0.0):
        out = []
        for m in messages_list:
            self.prompts.append(m[-1]["content"])
            first = re.search(r"\[Response A\]\n(.*?)\n\n", m[-1]["content"], re.S).group(1)
            out.append(self.rule(first))
        return out


def test_ai_labels_prefer_revision_and_skip_ties():
    chains = critique_revision_chains(ScriptedPolicy(), ["q1", "q2", "q3"], PRINCIPLES, rounds=1,
                                      rng=random.Random(0))
    chains[2].revisions[-1] = chains[2].initial  # nothing changed: no pair
    judge = Judge(lambda first: "[[A]]" if first.startswith("revised") else "[[B]]")
    records, counts, judgments = ai_preference_pairs(judge, chains, PRINCIPLES, rng=random.Random(1))
    assert (counts.pairs, counts.identical, counts.ties, counts.unparseable) == (2, 1, 0, 0)
    assert len(judgments) == 2 and len(judge.prompts) == 4  # both orders of 2 pairs
    for r, c in zip(records, chains):
        assert r["chosen"] == c.final and r["rejected"] == c.initial and r["chosen_is_revision"]
        assert r["source"] == "cai" and r["principle"] in {"p1", "p2"} and r["prompt"] == c.prompt
    # each judgment is conditioned on its principle's criterion
    assert all("[Criteria]\n- " in p for p in judge.prompts)

    biased = Judge(lambda first: "[[A]]")  # always the first slot: swap-inconsistent -> tie
    records, counts, _ = ai_preference_pairs(biased, chains, PRINCIPLES, rng=random.Random(1))
    assert records == [] and counts.ties == 2 and counts.swap_inconsistent == 2

    mute = Judge(lambda first: "no verdict")
    records, counts, _ = ai_preference_pairs(mute, chains, PRINCIPLES, rng=random.Random(1))
    assert records == [] and counts.unparseable == 2


def test_cai_command_end_to_end_on_the_tiny_model(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Sort the numbers 3 1 2."}\n{"prompt": "Reverse 1 2 3."}\n'
                       '{"prompt": "never used"}\n')
    cfg = load_config(CAIConfig, None, [f"prompts={prompts}", "max_prompts=2", "rounds=1",
                                        "policy=hf:tiny", "max_tokens=12", "judge_max_tokens=8",
                                        f"output_dir={tmp_path / 'run'}"])
    result = run_cai(cfg)
    run = tmp_path / "run"
    sft = [json.loads(x) for x in (run / "sft.jsonl").read_text().splitlines()]
    names = {p.name for p in load_constitution(DEFAULT_CONSTITUTION)}
    assert [r["prompt"] for r in sft] == ["Sort the numbers 3 1 2.", "Reverse 1 2 3."]
    for r in sft:
        assert {"prompt", "completion", "critiques", "principles"} <= set(r)
        assert len(r["critiques"]) == 1 and len(r["principles"]) == 1 and r["principles"][0] in names
        assert isinstance(r["completion"], str) and r["completion"] == r["revisions"][-1]
    prefs = [json.loads(x) for x in (run / "preferences.jsonl").read_text().splitlines()]
    counts = result["preferences"]
    # a random-init judge rarely writes a verdict: every pair must be accounted for somewhere
    assert counts["pairs"] + counts["ties"] + counts["unparseable"] + counts["identical"] == 2
    assert len(prefs) == counts["pairs"]
    for r in prefs:
        assert {"prompt", "chosen", "rejected", "source", "principle"} <= set(r) and r["source"] == "cai"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sft_records"] == 2 and (run / "config.yaml").exists()
