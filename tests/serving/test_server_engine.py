"""rollout.engine=server against `posttrain serve` on loopback: the same greedy rollouts as the local engine
for the same weights, weight sync after an update, GRPO learning the built-in task through two server
processes, and a killed server ending the run with an error that names it (never a hang)."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError, ServiceError
from pt_helpers import SFT_OVERRIDES, cached_run, run_cli, spawn_servers, torchrun

ROOT = Path(__file__).resolve().parents[2]
# tests/conftest.py's cache, read before tests/serving/conftest.py points this module at /tmp/ptcache: the
# SFT policy below is the one tests/rl trains and caches there
_RL_CACHE = os.environ["POSTTRAIN_CACHE"]
# tests/rl/test_learning.py's GRPO run and threshold, with the rollouts on two servers
GRPO = ["reward=builtin_correct", "rollout.prompts_per_step=32", "rollout.group_size=8", "train.max_steps=20",
        "train.lr=1e-4", "train.progress=false", "train.log_every=1", "task_eval_prompts=64", "task_eval_samples=4"]


@pytest.fixture(scope="module")
def sft_policy():
    """tests/conftest.py's cached SFT model of the built-in task (accuracy ~0.6), from the shared cache."""
    from posttrain.algorithms.sft import SFTConfig, run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_CACHE", _RL_CACHE)
        return str(cached_run("sft", SFTConfig, run, ["model.name_or_path=tiny", *SFT_OVERRIDES]) / "final")


@pytest.fixture(scope="module")
def thread_servers(sft_policy):
    from posttrain.serving.openai_server import start_server_in_thread

    started = []
    try:
        for _ in range(2):
            started.append(start_server_in_thread(sft_policy, port=0, logprobs_mode="processed_logprobs"))
        yield [url for url, _ in started]
    finally:
        for _, stop in started:
            stop()


@pytest.fixture()
def process_servers(sft_policy, tmp_path):
    servers = spawn_servers(sft_policy, tmp_path)
    try:
        yield servers
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def _engines(policy_path, urls):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollouts.config import RolloutConfig
    from posttrain.rollouts.experience import make_engine

    tok = load_tokenizer(policy_path)
    model = load_causal_lm(ModelConfig(name_or_path=policy_path))
    local = make_engine(model, tok, RolloutConfig(engine_dtype="model"))  # exact: fp32 like the servers
    remote = make_engine(model, tok, RolloutConfig(engine="server", servers=urls, server_timeout_s=60))
    return tok, model, local, remote


def _prompts(tok, n=12):
    from posttrain.data.chat import encode_prompt
    from posttrain.tasks import builtin

    return [encode_prompt(tok, p.prompt) for p in builtin.heldout_problems(n)]


def _greedy(tok, n=2):
    from posttrain.engines.rollout import SamplingParams

    return SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[tok.eos_token_id], n=n)


def test_server_rollouts_equal_the_local_engine(sft_policy, thread_servers):
    from dataclasses import replace

    from posttrain.engines.rollout import SamplingParams, prompt_seeds
    from posttrain.engines.server_engine import ServerRolloutEngine
    from posttrain.serving.generation import teacher_forced_logprobs

    tok, model, local, remote = _engines(sft_policy, thread_servers)
    try:
        assert isinstance(remote, ServerRolloutEngine) and remote.version == 1  # synced at construction
        prompts = _prompts(tok)
        a, b = local.generate(prompts, _greedy(tok)), remote.generate(prompts, _greedy(tok))
        assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
        assert [r.finish_reason for r in a] == [r.finish_reason for r in b] and "stop" in {r.finish_reason for r in b}
        assert all(r.completion_ids[-1] == tok.eos_token_id for r in b if r.finish_reason == "stop")
        assert [r.prompt_ids for r in b] == [p for p in prompts for _ in range(2)]
        gap = max(abs(x - y) for r, s in zip(a, b) for x, y in zip(r.logprobs, s.logprobs))
        assert gap < 1e-4, gap

        # sampling: reproducible with a seed, distinct samples within a group, and the log-probs are the
        # sampling distribution's (temperature 0.7) as a teacher-forced pass computes it
        sp = SamplingParams(max_new_tokens=24, temperature=0.7, stop_token_ids=[tok.eos_token_id], n=4, seed=3)
        s1, s2 = remote.generate(prompts, sp), remote.generate(prompts, sp)
        assert [r.completion_ids for r in s1] == [r.completion_ids for r in s2]
        # each prompt goes with its own seed (posttrain_seeds): a prompt sampled alone with its seed gives the
        # local engine's samples (alone: in a batch, another padding can flip a token by float rounding)
        one = replace(sp, seeds=[prompt_seeds(sp, 12)[3]])
        assert [r.completion_ids for r in remote.generate(prompts[3:4], one)] == \
            [r.completion_ids for r in local.generate(prompts[3:4], one)]
        assert len({tuple(r.completion_ids) for r in s1}) > len(prompts)
        tf = teacher_forced_logprobs(model, tok.pad_token_id, [(r.prompt_ids, r.completion_ids) for r in s1],
                                     processed=sp)
        assert max(abs(x - y) for r, (lp, _) in zip(s1, tf) for x, y in zip(r.logprobs, lp)) < 1e-4
    finally:
        remote.close()


def test_update_weights_moves_every_server_to_the_new_weights(sft_policy, thread_servers):
    tok, model, local, remote = _engines(sft_policy, thread_servers)
    try:
        prompts, sp = _prompts(tok), _greedy(tok, n=1)
        before = [r.completion_ids for r in remote.generate(prompts, sp)]
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        local.update_weights(model)
        remote.update_weights(model)
        assert remote.version == 2
        for url in thread_servers:
            assert httpx.get(url.removesuffix("/v1") + "/posttrain/weights").json()["version"] == 2
        after_local = [r.completion_ids for r in local.generate(prompts, sp)]
        assert after_local != before  # the update changes greedy outputs ...
        assert [r.completion_ids for r in remote.generate(prompts, sp)] == after_local  # ... on the servers too

        # an in-place change without update_weights (an optimizer step before an evaluation) is synced
        # before the next generate, never sampled stale
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.02)
        local.update_weights(model)
        assert [r.completion_ids for r in remote.generate(prompts, sp)] == \
            [r.completion_ids for r in local.generate(prompts, sp)]
        assert remote.version == 3
        files = list(remote.weights_dir.iterdir())
        assert len(files) == 1 and files[0].name.endswith("-3.safetensors")  # old versions are removed
    finally:
        remote.close()
    assert not remote.weights_dir.exists()


def _metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(r) for r in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_grpo_with_rollouts_on_two_serve_processes_raises_accuracy(sft_policy, process_servers, tmp_path):
    from posttrain.algorithms.grpo import GRPOConfig, run

    urls = [url for _, url in process_servers]
    cfg = load_config(GRPOConfig, None, [
        f"model.name_or_path={sft_policy}", f"train.output_dir={tmp_path / 'run'}", "rollout.engine=server",
        f"rollout.servers=[{', '.join(urls)}]", "rollout.server_timeout_s=120", *GRPO])
    s = run(cfg)
    before, after = s["initial"], s["final"]
    assert after["accuracy"] > before["accuracy"] + 0.06, (before, after)  # tests/rl/test_learning.py's bar
    rows = [r for r in _metric_rows(tmp_path / "run") if "reward/mean" in r]
    assert len(rows) == 20
    # the servers sample in fp32 with the sampling distribution's log-probs: the trainer's recomputation
    # agrees to float noise (the local bf16 engine: ~2e-3)
    assert max(r["logprob_gap"] for r in rows) < 1e-3
    versions = {httpx.get(u.removesuffix("/v1") + "/posttrain/weights").json()["version"] for u in urls}
    assert len(versions) == 1 and versions.pop() >= 21  # the start, then every RL step


@pytest.mark.slow
def test_lora_adapters_reach_the_servers_merged_into_the_weights(sft_policy, process_servers, tmp_path):
    """LoRA: the servers hold whole weights, so every sync sends W0 + (alpha/r) B A. The servers then sample
    from the trained policy: the trainer's recomputed log-probs agree with theirs to float noise while the
    policy moves away from the start (servers left with the initial weights would differ by far more). Online
    RL trains without dropout by default (model.dropout=auto), so the trainer's pass is the servers' function:
    with LoRA's dropout the gap was ~1e-2."""
    from posttrain.algorithms.grpo import GRPOConfig, run

    urls = [url for _, url in process_servers]
    run(load_config(GRPOConfig, None, [
        f"model.name_or_path={sft_policy}", f"train.output_dir={tmp_path}", "rollout.engine=server",
        f"rollout.servers=[{', '.join(urls)}]", "reward=builtin_correct", "rollout.prompts_per_step=8",
        "rollout.group_size=4", "train.max_steps=3", "lora.enabled=true", "train.lr=3e-3",
        "train.progress=false",
        "train.log_every=1", "task_eval_prompts=8", "task_eval_samples=1"]))
    rows = [r for r in _metric_rows(tmp_path) if "reward/mean" in r]
    assert len(rows) == 3 and rows[-1]["kl"] > 0.05, rows[-1]  # the policy moved
    assert max(r["logprob_gap"] for r in rows) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_trainer_processes_reach_the_servers_through_the_main_one(sft_policy, process_servers, tmp_path, strategy):
    """Under torchrun (2 processes, DDP or FSDP2) the main process drives the servers for both: it alone
    reloads their weights (FSDP: from the copy gathered for the step), and both processes' prompts go in one
    request (per-prompt seeds), so the run is the one-process run on the same servers: rewards, losses and
    final weights (to 1e-5)."""
    from safetensors.torch import load_file

    urls = [url for _, url in process_servers]
    args = [f"model.name_or_path={sft_policy}", "rollout.engine=server", f"rollout.servers=[{','.join(urls)}]",
            "reward=builtin_correct", "rollout.prompts_per_step=8", "rollout.group_size=4", "train.max_steps=2",
            "train.lr=1e-4", "train.progress=false", "train.log_every=1", "task_eval_prompts=8",
            "task_eval_samples=1", "train.threads=1"]
    one = run_cli("grpo", f"train.output_dir={tmp_path / 'one'}", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("grpo", f"train.output_dir={tmp_path / 'two'}", f"train.strategy={strategy}", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    a, b = ([r for r in _metric_rows(tmp_path / d) if "reward/mean" in r] for d in ("one", "two"))
    assert len(a) == len(b) == 2 and any(r["train/grad_norm"] > 0 for r in a)
    for x, y in zip(a, b):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)
    wa, wb = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("one", "two"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_a_server_killed_mid_run_stops_it_with_an_error_naming_the_server(sft_policy, process_servers, tmp_path):
    from posttrain.algorithms.grpo import GRPOConfig, run

    urls = [url for _, url in process_servers]
    run_dir = tmp_path / "run"
    cfg = load_config(GRPOConfig, None, [
        f"model.name_or_path={sft_policy}", f"train.output_dir={run_dir}", "rollout.engine=server",
        f"rollout.servers=[{', '.join(urls)}]", "rollout.server_timeout_s=600", *GRPO,
        "train.max_steps=200", "task_eval_prompts=8", "task_eval_samples=1"])
    victim, killed_at = process_servers[1][0], []

    def kill_after_first_step():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any("reward/mean" in r for r in _metric_rows(run_dir)):
            time.sleep(0.1)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_after_first_step, daemon=True).start()
    with pytest.raises(ServiceError) as e:
        run(cfg)
    # a refused connection ends the run at the next request (the rest of a step, then ~1.5 s of retries),
    # long before the 600 s answer timeout
    assert killed_at and time.monotonic() - killed_at[0] < 90
    assert urls[1].removesuffix("/v1") in str(e.value) and "Fix:" in str(e.value)
    assert 1 <= len([r for r in _metric_rows(run_dir) if "reward/mean" in r]) < 200


def test_server_settings_that_cannot_work_are_refused_at_start():
    from posttrain.algorithms.grpo import GRPOConfig

    cases = {"needs the servers' URLs": ["rollout.engine=server"],
             "rollout.engine is local": ["rollout.servers=[http://127.0.0.1:8001/v1]"],
             "not an http": ["rollout.engine=server", "rollout.servers=[127.0.0.1:8001]"],
             "server_timeout_s must be > 0": ["rollout.engine=server", "rollout.servers=[http://h:1/v1]",
                                              "rollout.server_timeout_s=0"],
             "server_retries must be >= 0": ["rollout.engine=server", "rollout.servers=[http://h:1/v1]",
                                             "rollout.server_retries=-1"],
             "applies to the local engine only": ["rollout.engine=server", "rollout.servers=[http://h:1/v1]",
                                                  "rollout.compile=true"],
             "rollout.engine is server": ["rollout.engine=server", "rollout.servers=[http://h:1/v1]",
                                          "rollout.vllm_kwargs={max_model_len: 512}"]}
    for message, overrides in cases.items():
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            load_config(GRPOConfig, None, overrides)
        assert e.value.where.startswith("rollout.")
    cfg = load_config(GRPOConfig, None, ["rollout.engine=server", "rollout.servers=[http://127.0.0.1:8001/v1]"])
    assert cfg.rollout.servers == ["http://127.0.0.1:8001/v1"] and cfg.rollout.server_timeout_s == 300


def test_an_unreachable_server_is_a_service_error_within_the_connect_timeout():
    from posttrain.engines.server_engine import ServerRolloutEngine

    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match=f"127.0.0.1:{port}"):
        ServerRolloutEngine([f"http://127.0.0.1:{port}/v1"], retries=1, backoff_s=0.1, connect_timeout_s=2)
    assert time.monotonic() - t0 < 10


def test_multi_turn_episodes_with_several_processes_on_servers_are_refused(tiny_path):
    """The main process sends every process's turn in one request; episodes that end after different numbers
    of turns on each process would leave the others waiting, so this is refused when the rollout engine is
    built, before any rollout."""
    from types import SimpleNamespace

    from posttrain.algorithms.grpo import GRPOConfig
    from posttrain.rollouts.online import rollout_engine

    cfg = load_config(GRPOConfig, None, [f"model.name_or_path={tiny_path}", "rollout.engine=server",
                                         "rollout.servers=[http://127.0.0.1:9/v1]", "rollout.environment=builtin:calc",
                                         "rollout.prompts=builtin:tool_prompts"])
    with pytest.raises(ConfigError, match="multi-turn episodes with several trainer processes") as e:
        rollout_engine(SimpleNamespace(world_size=2, is_main=True, rank=0), lambda: None, None, cfg)
    assert e.value.where == "rollout.environment"
