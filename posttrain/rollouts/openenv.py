"""OpenEnv environments as posttrain environments (``rollout.environment=openenv:http://HOST:PORT``).

An OpenEnv environment (``pip install posttrain[openenv]``, the ``openenv-core`` package) is a server
with a Gym-style protocol: ``reset(seed, episode_id, **kwargs) -> observation`` and ``step(action) ->
observation, reward, done``, one stateful session per WebSocket connection. This adapter opens one
session per episode with OpenEnv's own client and maps the two conversations onto each other:

- **reset**: the dataset row's fields go as keyword arguments (the server passes those its
  environment's ``reset`` accepts, so a task-aware environment learns its problem); the episode's
  first messages are the row's ``prompt``, or the reset observation as a user message if the row
  has none.
- **step**: each tool call in the assistant's turn is one action, its arguments the action's fields
  (the tool's name is not sent: an OpenEnv environment has one action type). A turn without tool
  calls sends its text in the action schema's text field (``message``, or the schema's only string
  field). The observation (its fields other than reward/done/metadata: one field as its text, several
  as JSON) comes back as a ``tool`` message after a tool call, a ``user`` message after text.
- The step's reward is the turn's reward; ``done`` ends the episode. A rejected action (the server's
  validation error) or a failed step is an observation the policy reads, never a crash. The session
  is closed when the episode ends (``close``).

All sessions share one event-loop thread; calls time out after ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from posttrain.errors import DataError
from posttrain.rollouts.episodes import Step

_LOOP: asyncio.AbstractEventLoop | None = None
_LOCK = threading.Lock()
_HIDDEN = {"reward", "done", "metadata"}


def _loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOCK:
        if _LOOP is None or _LOOP.is_closed():
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="posttrain-openenv", daemon=True).start()
        return _LOOP


def _client_cls():
    try:
        from openenv.core.generic_client import GenericEnvClient
    except ImportError as e:
        raise DataError("rollout.environment=openenv:... needs OpenEnv's client", where="rollout.environment",
                        fix="pip install 'posttrain[openenv]' (the openenv-core package)") from e
    return GenericEnvClient


def text_field(action_schema: dict, url: str) -> str:
    """The action field a plain-text turn goes in: ``message`` if the schema has it, else its only
    string field."""
    props = action_schema.get("properties", {})
    if "message" in props:
        return "message"
    strings = [k for k, v in props.items() if k != "metadata" and v.get("type") == "string"]
    if len(strings) == 1:
        return strings[0]
    raise DataError(f"the OpenEnv environment at {url} has no single text field in its action schema "
                    f"(fields: {', '.join(sorted(props)) or 'none'}), so a turn without tool calls cannot be sent",
                    where="rollout.environment", fix="give its action a 'message' string field, or have the policy "
                    "act through tool calls whose arguments are the action's fields")


def observation_text(obs: dict) -> str:
    shown = {k: v for k, v in obs.items() if k not in _HIDDEN and v is not None}
    if len(shown) == 1:
        v = next(iter(shown.values()))
        return v if isinstance(v, str) else json.dumps(v)
    return json.dumps(shown, sort_keys=True)


class OpenEnvEnvironment:
    """One episode in one session of the OpenEnv server at ``url``."""

    concurrent_steps = True  # run_episodes steps all sessions at once: a step is a wait on the server

    def __init__(self, url: str, text: str, timeout_s: float = 60.0):
        self.url, self.text, self.timeout_s = url, text, timeout_s
        self.client = _client_cls()(base_url=url, connect_timeout_s=timeout_s, message_timeout_s=timeout_s)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, _loop()).result(self.timeout_s + 5)

    def reset(self, row: dict) -> list[dict]:
        kwargs = {k: v for k, v in row.items() if _jsonable(v)}
        try:
            result = self._run(self.client.reset(**kwargs))
        except Exception as e:
            raise DataError(f"the OpenEnv environment at {self.url} failed to reset: {e}", where="rollout.environment",
                            fix="check the server is running and accepts sessions (max_concurrent_envs ≥ "
                                "prompts_per_step x group_size)") from e
        prompt = row.get("prompt")
        if prompt:
            return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        return [{"role": "user", "content": observation_text(result.observation)}]

    def _act(self, action: dict) -> tuple[str, float, bool, bool]:
        """(observation text, reward, done, failed) of one action."""
        try:
            r = self._run(self.client.step(action))
        except Exception as e:  # the server's refusal (validation error) or a failed step: the policy reads it
            return f"error: {e}", 0.0, False, True
        return observation_text(r.observation), float(r.reward or 0.0), bool(r.done), False

    def step(self, action: dict) -> Step:
        calls = action.get("tool_calls") or []
        if not calls:
            out, reward, done, failed = self._act({self.text: action.get("content") or ""})
            obs = [] if done else [{"role": "user", "content": out}]
            return Step(obs, reward=reward, done=done, info={"tool_errors": int(failed)})
        obs, total, done, errors = [], 0.0, False, 0
        for c in calls:
            args = c["function"]["arguments"]
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            if isinstance(args, dict):
                out, reward, done, failed = self._act(args)
            else:
                out, reward, failed = "error: the tool call's arguments are not a JSON object", 0.0, True
            obs.append({"role": "tool", "tool_call_id": c["id"], "content": out})
            total, errors = total + reward, errors + failed
            if done:
                break
        return Step([] if done else obs, reward=total, done=done,
                    info={"tool_calls": len(calls), "tool_errors": errors})

    def close(self) -> None:
        try:
            self._run(self.client.close())
        except Exception:  # the session is gone either way; the server reaps idle ones
            pass


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def openenv_factory(url: str, timeout_s: float = 60.0):
    """A factory of :class:`OpenEnvEnvironment` for ``url``, after checking the server answers and
    reading its action schema once."""
    import httpx

    _client_cls()
    try:
        r = httpx.get(url.rstrip("/") + "/schema", timeout=10.0)
        r.raise_for_status()
    except httpx.HTTPError as e:
        raise DataError(f"no OpenEnv server answers at {url}: {e}", where="rollout.environment",
                        fix="start the environment's server (e.g. `python -m posttrain.rollouts.openenv_tool_task "
                            "--port 8000`) and give its address") from e
    text = text_field(r.json().get("action", {}), url)
    return lambda: OpenEnvEnvironment(url.rstrip("/"), text, timeout_s)
