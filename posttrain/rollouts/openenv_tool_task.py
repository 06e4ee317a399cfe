"""The built-in tool task as an OpenEnv environment server: the reference for serving your own.

    python -m posttrain.rollouts.openenv_tool_task --port 8000        # needs posttrain[openenv]
    posttrain grpo ... rollout.environment=openenv:http://127.0.0.1:8000

An action is ``{"expr": "..."}`` (the calculator; the policy's tool call's arguments) or
``{"message": "..."}`` (the final answer, scored 1 for the exact sum, which ends the episode).
``reset`` receives the dataset row's fields and keeps ``answer``. The tool's output and its errors
read exactly as :class:`posttrain.rollouts.episodes.ToolEnvironment` writes them, so an episode
served here is the episode the built-in ``builtin:calc`` environment runs.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

from openenv.core.env_server.http_server import create_app
from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State

from posttrain.rollouts.episodes import calculator
from posttrain.tasks import tool_task


class CalcAction(Action):
    expr: Any = None          # a calculator call: arithmetic over numbers
    message: Optional[str] = None  # the final answer


class CalcObservation(Observation):
    output: str = ""


class CalcEnvironment(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True  # no shared state: each session has its own instance

    def __init__(self):
        super().__init__()
        self._state, self.answer = State(), ""

    def reset(self, seed: Optional[int] = None, episode_id: Optional[str] = None, answer: str = "",
              **_: Any) -> CalcObservation:
        self._state, self.answer = State(episode_id=episode_id), str(answer)
        return CalcObservation(output="")

    def step(self, action: CalcAction, timeout_s: Optional[float] = None, **_: Any) -> CalcObservation:
        self._state.step_count += 1
        if action.message is not None:
            return CalcObservation(done=True, reward=tool_task.score({"answer": self.answer}, action.message))
        try:
            out = calculator(action.expr)
        except Exception as e:  # as ToolEnvironment words a failing tool
            out = f"error: {type(e).__name__}: {e}"
        return CalcObservation(output=out, reward=0.0)

    @property
    def state(self) -> State:
        return self._state


def app(max_sessions: int = 512):
    return create_app(CalcEnvironment, CalcAction, CalcObservation, env_name="posttrain_tool_task",
                      max_concurrent_envs=max_sessions)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=512, help="concurrent episodes (one session each)")
    a = p.parse_args(argv)
    uvicorn.run(app(a.max_sessions), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
