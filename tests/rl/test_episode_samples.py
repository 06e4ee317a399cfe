"""The held-out episode evaluation leaves a few episodes for people to read (episodes.jsonl): the
conversation (prompt, tool calls, tool outputs, final answer), its reward and the step."""

import json

from posttrain.engines.rollout import Rollout
from posttrain.rollouts.episodes import load_environment
from posttrain.rollouts.task_eval import episode_eval

CALL = '<tool_call>{"name": "calc", "arguments": {"expr": "%s"}}</tool_call>'


class ToolThenAnswer:
    """Turn 0: a calculator call adding the prompt's digits; turn 1: the tool's output copied back (the turn
    is the per-episode seed modulo 131, see run_episodes)."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, prompts, params):
        outs = []
        for p, s in zip(prompts, params.seeds):
            text = self.tok.decode(p)
            if s % 131 == 0:
                digits = text.split("Add the numbers ")[1].split(".")[0].split()
                reply = CALL % "+".join(digits)
            else:
                reply = text.rsplit("tool\n", 1)[1].split("<|im_end|>")[0].strip()
            ids = [i for ch in reply for i in self.tok(ch, add_special_tokens=False)["input_ids"]]
            ids.append(self.tok.eos_token_id)
            outs.append(Rollout(list(p), ids, [-0.5] * len(ids), "stop"))
        return outs


def test_episode_eval_writes_one_episode_per_prompt(tokenizer, tmp_path):
    rows = [{"prompt": "Add the numbers 1 2 3.", "answer": "6"}, {"prompt": "Add the numbers 4 5.", "answer": "9"},
            {"prompt": "Add the numbers 7 7.", "answer": "14"}]
    out = tmp_path / "episodes.jsonl"
    m = episode_eval(ToolThenAnswer(tokenizer), tokenizer, load_environment("builtin:calc"), rows, 2, 0,
                     max_turns=4, max_tokens=256, max_new_tokens=64, save_to=out, step=7, keep=2)
    assert m["accuracy"] == 1.0 and m["episode/tool_calls"] == 1.0
    eps = [json.loads(r) for r in out.read_text().splitlines()]
    assert len(eps) == 2  # the first episode of each of the first `keep` prompts
    assert [e["row"] for e in eps] == [{"answer": "6"}, {"answer": "9"}]
    e = eps[0]
    assert e["step"] == 7 and e["reward"] == 1.0 and e["turns"] == 2 and e["tool_calls"] == 1
    assert [msg["role"] for msg in e["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert e["messages"][1]["tool_calls"][0]["function"] == {"name": "calc", "arguments": {"expr": "1+2+3"}}
    assert e["messages"][2]["content"].strip() == "6" and e["messages"][3]["content"] == "6"
    episode_eval(ToolThenAnswer(tokenizer), tokenizer, load_environment("builtin:calc"), rows[2:], 1, 0,
                 max_turns=4, max_tokens=256, max_new_tokens=64, save_to=out, step=9)
    assert [json.loads(r)["step"] for r in out.read_text().splitlines()] == [9]  # the latest evaluation only
