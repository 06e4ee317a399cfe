"""Multi-turn episodes, token in / token out: the trained ids are exactly the sampled ids and the
observation suffixes (never a re-tokenization), the mask covers exactly the sampled tokens, and a tool
that fails or hangs is an observation."""

import copy
import time

import pytest
import torch

from posttrain.engines.rollout import Rollout, SamplingParams
from posttrain.rollouts.episodes import (ToolEnvironment, calculator, episode_metrics, observation_suffix,
                                         parse_hermes, run_episodes)

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>'


class Scripted:
    """An engine that answers episode i's turn t with script[i][t] (token ids), whatever the prompt,
    recording the prompts it was sent. The episode and turn come from the per-episode seeds."""

    def __init__(self, script):
        self.script, self.prompts = script, []

    def generate(self, prompts, params):
        outs = []
        for p, s in zip(prompts, params.seeds):
            i, t = divmod(s, 131)
            ids = self.script[i][t]
            self.prompts.append(list(p))
            outs.append(Rollout(list(p), ids, [-0.5] * len(ids), "stop"))
        return outs

    def update_weights(self, model, version=None):
        pass


def char_ids(tok, text):
    """``text`` one character per token (a split a BPE tokenizer would merge) + the end-of-turn token."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id]


def score(row, text):
    return float(text.strip() == row["answer"])


def params():
    return SamplingParams(max_new_tokens=64, n=1)


def _episode(tok, script, **kw):
    env = ToolEnvironment({"calculator": calculator}, score)
    engine = Scripted(script)
    eps = run_episodes(engine, tok, [env], [{"prompt": "What is 2+3?", "answer": "5"}], params(),
                       max_turns=kw.get("max_turns", 4), max_tokens=kw.get("max_tokens", 512))
    return eps[0], engine


def test_episode_ids_are_the_sampled_ids_and_observation_suffixes(tokenizer):
    s1, s2 = char_ids(tokenizer, CALL % "2+3"), char_ids(tokenizer, "5")
    ep, engine = _episode(tokenizer, {0: [s1, s2]})
    suffix = observation_suffix(tokenizer, [{"role": "tool", "tool_call_id": "call_0", "content": "5"}],
                                tokenizer.eos_token)
    assert ep.completion_ids == s1 + suffix + s2
    assert ep.mask == [1] * len(s1) + [0] * len(suffix) + [1] * len(s2)
    assert ep.logprobs == [-0.5] * len(s1) + [0.0] * len(suffix) + [-0.5] * len(s2)
    assert engine.prompts[1] == ep.prompt_ids + s1 + suffix  # turn 2 continues from the sampled ids
    assert ep.reward == 1.0 and ep.turns == 2 and ep.tool_calls == 1 and ep.tool_errors == 0
    assert ep.messages[2] == {"role": "tool", "tool_call_id": "call_0", "content": "5"}
    # re-tokenizing the conversation would train on other ids than the ones sampled
    whole = tokenizer.apply_chat_template(ep.messages, tokenize=False)
    assert tokenizer(whole, add_special_tokens=False)["input_ids"][:len(ep.prompt_ids) + len(ep.completion_ids)] \
        != ep.prompt_ids + ep.completion_ids


def test_a_template_that_rewrites_earlier_turns_does_not_change_the_trained_ids(tokenizer):
    """Like Qwen3's template, this one drops the reasoning of earlier assistant turns when it renders a
    whole conversation; the episode never renders one, so its ids stay the sampled ones."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = tokenizer.chat_template.replace(
        "(message['content'] or '')",
        "((message['content'] or '').split('</think>')[-1] if message['role'] == 'assistant' and not loop.last "
        "else (message['content'] or ''))")
    s1 = char_ids(tok, "<think>add them</think>" + CALL % "2+3")
    s2 = char_ids(tok, "5")
    ep, _ = _episode(tok, {0: [s1, s2]})
    suffix = observation_suffix(tok, [{"role": "tool", "tool_call_id": "call_0", "content": "5"}], tok.eos_token)
    assert ep.completion_ids == s1 + suffix + s2 and sum(ep.mask) == len(s1) + len(s2)
    ep.messages[1]["content"] = "<think>add them</think>"  # the sampled turn as it was
    whole = tok.apply_chat_template(ep.messages, tokenize=False)
    assert "add them" not in whole  # the whole-conversation rendering differs from what was sampled


def test_failing_and_hanging_tools_are_observations(tokenizer):
    def boom(expression):
        raise ZeroDivisionError("division by zero")

    def hang(expression):
        time.sleep(5)
        return "late"

    env = ToolEnvironment({"calculator": boom, "slow": hang, "calc": calculator}, score, timeout_s=0.2)
    env.reset({"prompt": "x", "answer": "1"})
    st = env.step({"content": "", "tool_calls": parse_hermes(
        CALL % "1/0" + '<tool_call>{"name": "slow", "arguments": {"expression": "1"}}</tool_call>'
        + '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{bad json</tool_call>'
        + '<tool_call>{"name": "calc", "arguments": {"expression": "__import__(\\"os\\")"}}</tool_call>')[1]})
    outs = [m["content"] for m in st.observation]
    assert outs[0] == "error: ZeroDivisionError: division by zero"
    assert outs[1] == "error: slow timed out after 0.2 s"
    assert outs[2].startswith("error: no tool named 'nope'") and outs[3].startswith("error: no tool named ''")
    assert outs[4].startswith("error: ValueError: not arithmetic")
    assert st.info["tool_errors"] == 5 and not st.done


def test_turn_and_token_limits_end_episodes_and_are_counted(tokenizer):
    loop = char_ids(tokenizer, CALL % "1+1")
    ep, _ = _episode(tokenizer, {0: [loop] * 5}, max_turns=3)
    assert ep.truncated == "turns" and ep.turns == 3 and ep.tool_calls == 3
    ep2, _ = _episode(tokenizer, {0: [loop] * 5}, max_tokens=len(loop) + 5)
    assert ep2.truncated == "tokens" and len(ep2.completion_ids) <= len(loop) + 5
    m = episode_metrics([ep, ep2])
    assert m["episode/truncated_turns"] == 0.5 and m["episode/truncated_tokens"] == 0.5
    assert 0 < m["episode/masked_frac"] < 1


def test_calculator():
    assert calculator("2 + 3 * (4 - 1)") == "11" and calculator("7 / 2") == "3.5" and calculator("-2**3") == "-8"
    with pytest.raises(ValueError):
        calculator("open('x')")
    with pytest.raises(ValueError):
        calculator("9 ** 999")


def test_real_engine_episode_logprobs_are_the_models_on_the_trained_ids(tiny_model, tokenizer):
    """With the tiny model and the fp32 engine, each sampled token's log-prob in the episode is the model's
    own at that position of prompt + completion ids (the token path is exact)."""
    from posttrain.engines.rollout import HFRolloutEngine

    engine = HFRolloutEngine(tiny_model, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)
    envs = [ToolEnvironment({"calculator": calculator}, score) for _ in range(3)]
    rows = [{"prompt": f"Add {a} and {b}.", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
    eps = run_episodes(engine, tokenizer, envs, rows, SamplingParams(max_new_tokens=12, n=1), max_turns=2,
                       max_tokens=40, seed=3)
    for ep in eps:
        ids = torch.tensor([ep.prompt_ids + ep.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(ids).logits[0, :-1].float(), -1)
        P = len(ep.prompt_ids)
        taken = logp[P - 1:, :].gather(-1, ids[0, P:, None]).squeeze(-1)
        m = torch.tensor(ep.mask, dtype=torch.bool)
        assert torch.allclose(taken[m], torch.tensor(ep.logprobs)[m], atol=1e-4)
        assert sum(ep.mask) == len([x for x in ep.logprobs if x != 0.0])


def test_the_python_tool_runs_in_the_sandbox_and_reports_failures():
    from posttrain.rollouts.episodes import python_tool

    run = python_tool(timeout_s=3)
    assert run("print(sum([7, 5, 9, 8, 6]))").strip() == "35"
    assert run("print('a'); 1/0").startswith("a\nerror: solution: ZeroDivisionError")
    assert run("while True: pass").startswith("error: timeout")
    assert "MemoryError" in run("x = bytearray(2**33)")


def test_a_python_tool_episode(tokenizer):
    from posttrain.rollouts.episodes import load_environment

    call = '<tool_call>{"name": "python", "arguments": {"code": "print(2+3)"}}</tool_call>'
    engine = Scripted({0: [char_ids(tokenizer, call), char_ids(tokenizer, "5")]})
    ep = run_episodes(engine, tokenizer, [load_environment("builtin:python")()], [{"prompt": "2+3?", "answer": "5"}],
                      params(), max_turns=3, max_tokens=512)[0]
    assert ep.messages[2]["content"].strip() == "5" and ep.reward == 1.0 and ep.tool_errors == 0


class PerTurn(ToolEnvironment):
    """The calculator environment that also pays 0.25 for each turn that calls a tool."""

    def step(self, action):
        st = super().step(action)
        return st if st.done else type(st)(st.observation, 0.25, False, st.info)


def test_per_turn_rewards_sit_on_each_turns_last_sampled_token(tokenizer):
    from posttrain.rollouts.episodes import episode_batch

    s1, s2, s3 = (char_ids(tokenizer, CALL % "2+3"), char_ids(tokenizer, CALL % "1+1"), char_ids(tokenizer, "5"))
    eps = run_episodes(Scripted({0: [s1, s2, s3]}), tokenizer, [PerTurn({"calculator": calculator}, score)],
                       [{"prompt": "What is 2+3?", "answer": "5"}], params(), max_turns=4, max_tokens=512)
    ep = eps[0]
    assert ep.turn_rewards == [0.25, 0.25, 1.0] and ep.reward == 1.5
    b = episode_batch(eps)
    ends = b["token_rewards"][0].nonzero().flatten().tolist()
    assert ends == ep.turn_ends and b["token_rewards"][0, ends].tolist() == [0.25, 0.25, 1.0]
    assert ends[0] == len(s1) - 1 and ends[-1] == len(ep.completion_ids) - 1
    assert all(ep.mask[e] == 1 for e in ends) and b["scores"].tolist() == [1.5]
    m = episode_metrics(eps)
    assert m["episode/turn_reward"] == 0.5 and m["episode/before_last_reward"] == 0.5
