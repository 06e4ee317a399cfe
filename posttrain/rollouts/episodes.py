"""Multi-turn episodes against environments, token in / token out.

An **environment** is any object with ``reset(row) -> messages`` (the conversation the episode starts
from) and ``step(action) -> Step`` (the observation messages to append, a reward, whether the episode
is done). ``action`` is the assistant turn the policy sampled: ``{"role": "assistant", "content": text,
"tool_calls": [...]}``, the tool calls parsed from the text by the chat template's family parser.

**Token exactness.** Each turn's prompt is the previous turn's prompt ids + the ids the policy
sampled + the observation rendered by the chat template *as a suffix* (:func:`observation_suffix`):
the conversation is never decoded and encoded again, so the trained tokens are the sampled tokens,
whatever the template does to a whole conversation (templates that rewrite earlier turns, tokenizers
that merge across a boundary). The loss mask is 1 exactly on sampled tokens; the observation and
tool-output tokens are context only.

Limits: ``max_turns`` policy turns and ``max_tokens`` tokens after the first prompt; an episode that
reaches either ends there, counted by which limit (``truncated``).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

from posttrain.data.chat import encode_prompt
from posttrain.engines.rollout import SamplingParams
from posttrain.errors import DataError


@dataclass
class Step:
    observation: list[dict]          # messages appended after the assistant turn (role tool / user); [] if done
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)


class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]: ...

    def step(self, action: dict) -> Step: ...


@dataclass
class Episode:
    prompt_ids: list[int]            # the first prompt
    completion_ids: list[int]        # every token after it: sampled turns and observation suffixes, in order
    mask: list[int]                  # 1 on the sampled tokens only
    logprobs: list[float]            # the sampling log-prob of each sampled token, 0 on observation tokens
    turn_rewards: list[float]
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    truncated: str | None = None     # None, "turns" or "tokens"
    turn_ends: list[int] = field(default_factory=list)  # index in completion_ids of each turn's last sampled token
    messages: list[dict] = field(default_factory=list)  # the conversation, for people to read

    @property
    def reward(self) -> float:
        return sum(self.turn_rewards)


# ----------------------------------------------------------------------------- tool calls in text

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_hermes(text: str) -> tuple[str, list[dict]]:
    """``text<tool_call>{"name": ..., "arguments": {...}}</tool_call>...`` (Qwen, Hermes and the tiny model's
    template) -> (the text without the calls, OpenAI-style tool calls). A call that is not valid JSON is
    kept as a call named ``""`` whose arguments hold the raw text, so the environment can answer it."""
    calls = []
    for i, m in enumerate(_HERMES.finditer(text)):
        try:
            obj = json.loads(m.group(1).strip())
            name, args = str(obj.get("name", "")), obj.get("arguments", {})
        except (json.JSONDecodeError, AttributeError):
            name, args = "", {"raw": m.group(1).strip()}
        calls.append({"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}})
    return _HERMES.sub("", text).strip(), calls


TOOL_PARSERS: dict[str, Callable[[str], tuple[str, list[dict]]]] = {"hermes": parse_hermes}


# ----------------------------------------------------------------------------- tools

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg,
        ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate arithmetic (+ − × / // % **, parentheses, numbers) without eval; anything else is an error."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    value = ev(ast.parse(str(expression), mode="eval"))
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def python_tool(timeout_s: float = 5.0, memory_mb: int = 512) -> Callable[[str], str]:
    """A Python tool: ``code -> what it prints`` in the code verifier's sandbox (a limited, isolated child
    process per call, killed at ``timeout_s``); an exception or a limit comes back as ``error: ...``."""
    from posttrain.rewards.code import CodeTestsReward

    box = CodeTestsReward(timeout_s=timeout_s, memory_mb=memory_mb)
    return lambda code: box.run_script(str(code))


class ToolEnvironment:
    """Tool use: every tool call in the assistant's turn is run (timed, ``timeout_s`` each) and its
    output, or its error, is a ``tool`` message; the episode ends at a turn without tool calls, scored
    by ``score(row, final_text) -> float``. A tool that raises or times out is an observation the
    policy reads, never a crash."""

    def __init__(self, tools: dict[str, Callable[..., str]], score: Callable[[dict, str], float],
                 timeout_s: float = 5.0):
        self.tools, self.score, self.timeout_s = tools, score, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=1)
        self.row: dict = {}

    def reset(self, row: dict) -> list[dict]:
        self.row = row
        prompt = row["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]

    def call(self, call: dict) -> tuple[str, bool]:
        """(output, failed) of one tool call."""
        fn = call["function"]
        tool = self.tools.get(fn["name"])
        if tool is None:
            return f"error: no tool named {fn['name']!r} (tools: {', '.join(sorted(self.tools))})", True
        args = fn["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return f"error: arguments are not JSON: {args[:80]}", True
        future = self._pool.submit(tool, **args) if isinstance(args, dict) else None
        if future is None:
            return "error: arguments must be an object", True
        try:
            return str(future.result(timeout=self.timeout_s)), False
        except FutureTimeout:
            self._pool = ThreadPoolExecutor(max_workers=1)  # the stuck call keeps its thread; new calls get another
            return f"error: {fn['name']} timed out after {self.timeout_s:g} s", True
        except Exception as e:  # the tool's own failure is the observation
            return f"error: {type(e).__name__}: {e}", True

    def step(self, action: dict) -> Step:
        calls = action.get("tool_calls") or []
        if not calls:
            return Step([], reward=float(self.score(self.row, action.get("content") or "")), done=True)
        outs = [self.call(c) for c in calls]
        obs = [{"role": "tool", "tool_call_id": c["id"], "content": out} for c, (out, _) in zip(calls, outs)]
        return Step(obs, info={"tool_calls": len(calls), "tool_errors": sum(failed for _, failed in outs)})


# ----------------------------------------------------------------------------- rendering

_PROBE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]


def observation_suffix(tokenizer, observation: list[dict], eos_text: str) -> list[int]:
    """Token ids of ``observation`` rendered by the chat template after an assistant turn that ended with
    ``eos_text``, up to the next assistant turn's header: the template's text between the end of the
    sampled tokens and the start of the next sample, and nothing else. Only this suffix is tokenized."""
    before = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    turn_end = before.rfind("!" + eos_text)
    if turn_end < 0:
        raise DataError(f"the chat template does not end an assistant turn with {eos_text!r}, the token the "
                        "policy stops at, so a multi-turn prompt cannot continue from the sampled tokens",
                        where="chat template", fix="use a template whose assistant turns end with the EOS token")
    prefix = before[:turn_end + 1 + len(eos_text)]
    full = tokenizer.apply_chat_template(_PROBE + observation, tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise DataError("the chat template renders an assistant turn differently once more messages follow, so the "
                        "observation cannot be appended as a suffix", where="chat template")
    return tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the rollout loop


def run_episodes(engine, tokenizer, envs: list, rows: list[dict], params: SamplingParams, *, max_turns: int,
                 max_tokens: int, parser: str = "hermes", seed: int = 0) -> list[Episode]:
    """One episode per (environment, row), all advanced together turn by turn through ``engine`` (token
    ids in, token ids out). ``params.n`` must be 1 (a group is G environments with the same row); each
    episode's turn t is sampled with its own seed, a function of (seed, episode, turn)."""
    if params.n != 1:
        raise DataError("run_episodes samples one continuation per episode (params.n=1); a group of G is G "
                        "episodes of the same row", where="SamplingParams.n")
    parse, eos_id = TOOL_PARSERS[parser], tokenizer.eos_token_id
    eos_text = tokenizer.convert_ids_to_tokens(eos_id)
    eps, ids = [], []
    for env, row in zip(envs, rows):
        msgs = env.reset(row)
        prompt = encode_prompt(tokenizer, msgs)
        eps.append(Episode(prompt, [], [], [], [], messages=list(msgs)))
        ids.append(list(prompt))
    active = list(range(len(eps)))
    for turn in range(max_turns):
        if not active:
            break
        budget = [max_tokens - len(eps[i].completion_ids) for i in active]
        p = replace(params, max_new_tokens=max(1, min(params.max_new_tokens, max(budget))), seed=None,
                    seeds=[((seed * 1_000_003 + i) * 131 + turn) % 2**62 for i in active], stop_token_ids=[eos_id])
        outs = engine.generate([ids[i] for i in active], p)
        acting = []  # (episode, action) of the turns that ended at the end-of-turn token
        for i, out, left in zip(active, outs, budget):
            ep, sampled = eps[i], list(out.completion_ids)[:max(left, 0)]
            ep.completion_ids += sampled
            ep.mask += [1] * len(sampled)
            ep.logprobs += list(out.logprobs)[:len(sampled)]
            ep.turns += 1
            ep.turn_ends.append(len(ep.completion_ids) - 1)  # -1 for an empty first turn: no token to credit
            ids[i] += sampled
            content, calls = parse(tokenizer.decode(sampled, skip_special_tokens=True))
            action = {"role": "assistant", "content": content, "tool_calls": calls}
            ep.messages.append(action)
            if not sampled or sampled[-1] != eos_id:  # cut by the token budget: no complete turn to act on
                ep.truncated = "tokens"
                ep.turn_rewards.append(0.0)
            else:
                acting.append((i, action))
        still = []
        for (i, _), st in zip(acting, _step_all(envs, acting)):
            ep = eps[i]
            ep.turn_rewards.append(float(st.reward))
            ep.tool_calls += int(st.info.get("tool_calls", 0))
            ep.tool_errors += int(st.info.get("tool_errors", 0))
            ep.messages += st.observation
            if st.done:
                continue
            suffix = observation_suffix(tokenizer, st.observation, eos_text)
            if len(ep.completion_ids) + len(suffix) >= max_tokens:
                ep.truncated = "tokens"
                continue
            ep.completion_ids += suffix
            ep.mask += [0] * len(suffix)
            ep.logprobs += [0.0] * len(suffix)
            ids[i] += suffix
            still.append(i)
        active = still
    for i in active:  # still going after max_turns
        eps[i].truncated = "turns"
    for env in envs:  # remote sessions end with their episodes
        if hasattr(env, "close"):
            env.close()
    return eps


def _step_all(envs: list, acting: list[tuple[int, dict]]) -> list[Step]:
    """Each acting episode's environment steps on its action; environments that declare
    ``concurrent_steps = True`` (remote ones: their steps are waits) step at the same time."""
    together = [k for k, (i, _) in enumerate(acting) if getattr(envs[i], "concurrent_steps", False)]
    out: list = [None] * len(acting)
    if len(together) > 1:
        with ThreadPoolExecutor(max_workers=min(32, len(together))) as pool:
            for k, st in zip(together, pool.map(lambda k: envs[acting[k][0]].step(acting[k][1]), together)):
                out[k] = st
    for k, (i, action) in enumerate(acting):
        if out[k] is None:
            out[k] = envs[i].step(action)
    return out


def episode_metrics(eps: list[Episode]) -> dict[str, Any]:
    """Turns, tool calls and errors per episode, masked-token share, truncation by limit (docs/metrics.md)."""
    n = max(len(eps), 1)
    tokens = sum(len(e.mask) for e in eps)
    turn_rewards = [r for e in eps for r in e.turn_rewards]
    return {"episode/turns": sum(e.turns for e in eps) / n,
            "episode/turn_reward": sum(turn_rewards) / max(len(turn_rewards), 1),
            "episode/before_last_reward": sum(sum(e.turn_rewards[:-1]) for e in eps) / n, "episode/tool_calls": sum(e.tool_calls for e in eps) / n,
            "episode/tool_errors": sum(e.tool_errors for e in eps) / n,
            "episode/masked_frac": 1 - sum(sum(e.mask) for e in eps) / max(tokens, 1),
            "episode/truncated_turns": sum(e.truncated == "turns" for e in eps) / n,
            "episode/truncated_tokens": sum(e.truncated == "tokens" for e in eps) / n}


# ----------------------------------------------------------------------------- loading and batching


def load_environment(spec: str) -> Callable[[], Any]:
    """A factory of fresh environments (one per episode) for ``rollout.environment``."""
    from posttrain.tasks import tool_task

    if spec == "builtin:calc":
        return lambda: ToolEnvironment({tool_task.TOOL: lambda expr: calculator(expr)}, tool_task.score)
    if spec == "builtin:python":  # the tool task with a sandboxed Python tool instead of the calculator
        run = python_tool()
        return lambda: ToolEnvironment({"python": lambda code: run(code)}, tool_task.score, timeout_s=10.0)
    if spec == "builtin:no_tools":
        return lambda: ToolEnvironment({}, tool_task.score)
    if spec.startswith("openenv:"):  # an OpenEnv server: openenv:http://host:port
        from posttrain.rollouts.openenv import openenv_factory

        return openenv_factory(spec[len("openenv:"):])
    if ":" in spec and not spec.startswith("builtin:"):
        import importlib

        module, name = spec.rsplit(":", 1)
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise DataError(f"cannot load the environment {spec!r}: {e}", where="rollout.environment",
                            fix="give module:Class with the module importable (on PYTHONPATH)") from e
        return cls
    raise DataError(f"unknown environment {spec!r}", where="rollout.environment",
                    fix="use builtin:calc, builtin:python, builtin:no_tools, openenv:URL or module:Class")


def episode_batch(eps: list[Episode]) -> dict:
    """Episodes as the tensors of an RL batch: scores [N] (the sum of turn rewards), mask and rollout
    log-probs [N, T] (T the longest episode after its prompt; the mask is 1 on sampled tokens only),
    token_rewards [N, T] (each turn's reward on its last sampled token), final texts, finish reasons."""
    import torch

    T = max((len(e.completion_ids) for e in eps), default=0) or 1
    mask, rlp, tok_r = torch.zeros(len(eps), T), torch.zeros(len(eps), T), torch.zeros(len(eps), T)
    for i, e in enumerate(eps):
        mask[i, :len(e.mask)] = torch.tensor(e.mask, dtype=torch.float32)
        rlp[i, :len(e.logprobs)] = torch.tensor(e.logprobs, dtype=torch.float32)
        for end, r in zip(e.turn_ends, e.turn_rewards):
            tok_r[i, max(end, 0)] += r  # an empty turn (end -1) earns only 0 (a token-limit stop)
    last = [next((m.get("content") or "" for m in reversed(e.messages) if m["role"] == "assistant"), "")
            for e in eps]
    return {"prompt_ids": [e.prompt_ids for e in eps], "completion_ids": [e.completion_ids for e in eps],
            "texts": last, "finish": ["length" if e.truncated else "stop" for e in eps],
            "scores": torch.tensor([e.reward for e in eps], dtype=torch.float32), "mask": mask, "rollout_logp": rlp,
            "token_rewards": tok_r}
