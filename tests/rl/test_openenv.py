"""OpenEnv environments through the adapter: the built-in tool task served by OpenEnv's own server
(a child process on loopback) runs the same episodes as the built-in calculator environment, tool
failures and refused actions are observations, and GRPO trains against the server."""

import json
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("openenv")

from posttrain.engines.rollout import SamplingParams  # noqa: E402
from posttrain.errors import DataError  # noqa: E402
from posttrain.rollouts.episodes import load_environment, run_episodes  # noqa: E402
from posttrain.rollouts.openenv import observation_text, text_field  # noqa: E402
from pt_helpers import ROOT, free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("openenv") / "server.log"  # a file: a pipe nobody reads would fill and block it
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.rollouts.openenv_tool_task", "--port", str(port)],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the OpenEnv server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _call(args):
    return {"id": "c0", "type": "function", "function": {"name": "calc", "arguments": args}}


def test_actions_and_observations_map_both_ways(server):
    env = load_environment(f"openenv:{server}")()
    row = {"prompt": "Add the numbers 7 5 9 8 6.", "answer": "35"}
    assert env.reset(row) == [{"role": "user", "content": row["prompt"]}]
    st = env.step({"role": "assistant", "content": "", "tool_calls": [_call({"expr": "7+5+9+8+6"})]})
    assert st.observation == [{"role": "tool", "tool_call_id": "c0", "content": "35"}]
    assert not st.done and st.info == {"tool_calls": 1, "tool_errors": 0}
    st = env.step({"role": "assistant", "content": "", "tool_calls": [_call({"expr": "__import__('os')"})]})
    assert st.observation[0]["content"].startswith("error: ValueError: not arithmetic")  # the tool's own error
    st = env.step({"role": "assistant", "content": "", "tool_calls": [_call({"nope": 1})]})  # refused by the server
    assert st.observation[0]["content"].startswith("error: ") and st.info["tool_errors"] == 1 and not st.done
    st = env.step({"role": "assistant", "content": "", "tool_calls": [_call("{not json")]})
    assert "not a JSON object" in st.observation[0]["content"] and st.info["tool_errors"] == 1
    st = env.step({"role": "assistant", "content": "35", "tool_calls": []})
    assert st.done and st.reward == 1.0 and st.observation == []
    env.close()
    env = load_environment(f"openenv:{server}")()
    env.reset(row)
    assert env.step({"role": "assistant", "content": "34", "tool_calls": []}).reward == 0.0
    env.close()


def test_the_adapter_reads_schemas_and_refuses_clearly():
    assert text_field({"properties": {"message": {"type": "string"}, "x": {"type": "integer"}}}, "u") == "message"
    assert text_field({"properties": {"code": {"type": "string"}, "metadata": {"type": "object"}}}, "u") == "code"
    with pytest.raises(DataError, match="no single text field"):
        text_field({"properties": {"a": {"type": "string"}, "b": {"type": "string"}}}, "u")
    assert observation_text({"output": "35", "reward": 1, "done": True, "metadata": {}}) == "35"
    assert json.loads(observation_text({"stdout": "x", "exit_code": 0})) == {"exit_code": 0, "stdout": "x"}
    with pytest.raises(DataError, match="no OpenEnv server answers at http://127.0.0.1:9"):
        load_environment("openenv:http://127.0.0.1:9")


def test_served_episodes_equal_the_builtin_environments(server, tool_sft_policy):
    """The tool SFT policy, the same seeds: every episode without a tool error is token for token and
    reward for reward the built-in calculator environment's episode (errors are worded by the server's
    validation, so those may differ)."""
    from posttrain.engines.rollout import HFRolloutEngine
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.tasks import tool_task

    model, tok = load_causal_lm(ModelConfig(name_or_path=tool_sft_policy)).eval(), load_tokenizer(tool_sft_policy)
    engine = HFRolloutEngine(model, pad_token_id=tok.pad_token_id, tokenizer=tok)
    rows = tool_task.prompt_records(12, held=True)
    runs = {}
    for spec in ("builtin:calc", f"openenv:{server}"):
        make = load_environment(spec)
        runs[spec] = run_episodes(engine, tok, [make() for _ in rows], rows, SamplingParams(max_new_tokens=96, n=1,
                                  temperature=1.0), max_turns=3, max_tokens=160, seed=7)
    clean = [(a, b) for a, b in zip(*runs.values()) if a.tool_errors == 0 and b.tool_errors == 0]
    assert len(clean) >= 8
    assert sum(a.tool_calls for a, _ in clean) >= 6  # the policy does call the tool
    for a, b in clean:
        assert b.completion_ids == a.completion_ids and b.mask == a.mask and b.turn_rewards == a.turn_rewards


def test_grpo_runs_against_the_server(server, tiny_path, tmp_path):
    from posttrain.algorithms.grpo import GRPOConfig, run
    from posttrain.config import load_config

    s = run(load_config(GRPOConfig, None, [
        f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}", f"rollout.environment=openenv:{server}",
        "rollout.prompts=builtin:tool_prompts", "rollout.prompts_per_step=4", "rollout.group_size=2",
        "rollout.max_new_tokens=8", "rollout.max_episode_tokens=24", "train.max_steps=1", "train.progress=false",
        "task_eval_prompts=4", "task_eval_samples=1"]))
    step = next(json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if "reward/mean" in r)
    assert step["batch/rollouts"] == 8 and "episode/turns" in step and "accuracy" in s["final"]
