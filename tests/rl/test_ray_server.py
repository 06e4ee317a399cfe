"""launcher=ray with rollout.engine=server (and vllm): each Ray rollout worker fronts its own share of
rollout.servers (worker i: servers i, i+N, ...), here `posttrain serve` processes on loopback.

The Ray tests run only in a private network namespace (tests/rl/test_ray.py says why); the config refusals
at the end need no Ray and run anywhere.
"""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError, ServiceError
from pt_helpers import local_ray_cluster, spawn_servers

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["reward=builtin_correct", "train.progress=false", "train.log_every=1", "rollout.prompts_per_step=8",
         "rollout.group_size=4", "train.max_steps=2", "train.lr=1e-4", "task_eval_prompts=8",
         "task_eval_samples=1", "rollout.server_timeout_s=60"]
EXACT = ("reward/mean", "reward/std", "train/loss", "kl", "entropy", "response/length_mean")

cluster = pytest.fixture(scope="module")(local_ray_cluster)


def _spawn_servers(model_path: str, logs: Path, n: int):
    logs.mkdir(parents=True, exist_ok=True)
    return spawn_servers(model_path, logs, n)


def _stop(servers) -> None:
    for proc, _ in servers:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(sft_policy, tmp_path_factory, request):
    """Three `posttrain serve` processes (two for the runs, one to be killed), started together and booting
    while the Ray cluster starts (~4 s less than one after the other on 2 cores)."""
    interfaces = {line.split(":")[0].strip() for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]}
    if not interfaces <= {"lo"}:
        request.getfixturevalue("cluster")  # skips, saying why, before any server starts
    logs, box = tmp_path_factory.mktemp("servers"), {}

    def boot():
        try:
            box["servers"] = _spawn_servers(sft_policy, logs, 3)
        except Exception as e:  # raised below, in the test's thread
            box["error"] = e

    booting = threading.Thread(target=boot)
    booting.start()
    try:
        request.getfixturevalue("cluster")
        booting.join()
        if "error" in box:
            raise box["error"]
        yield box["servers"]
    finally:
        booting.join()
        _stop(box.get("servers", []))


def _grpo(policy, out, urls, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    return run(load_config(GRPOConfig, None, [f"model.name_or_path={policy}", f"train.output_dir={out}", *SMALL,
                                              "rollout.engine=server", f"rollout.servers=[{', '.join(urls)}]", *extra]))


def _rows(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(r) for r in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "reward/mean" in r]


@pytest.mark.ray
def test_ray_workers_fronting_servers_equal_one_process_with_the_same_servers(sft_policy, tmp_path, servers):
    """Two workers, one server each, against one process driving both servers: the same rewards, losses and
    final weights (each prompt has its own seed, and each server gets the same block of prompts either way);
    every server ends at the run's last weights, which a worker reported only after its server held them."""
    from safetensors.torch import load_file

    urls = [u for _, u in servers[:2]]
    _grpo(sft_policy, tmp_path / "local", urls)
    s = _grpo(sft_policy, tmp_path / "ray", urls, "launcher=ray", "ray.rollout_workers=2")
    a, b = _rows(tmp_path / "local"), _rows(tmp_path / "ray")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in EXACT:
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
        assert y["async/staleness_max"] == 0
    assert any(r["reward/std"] > 0 for r in b)  # a learning signal: the updates move the weights
    wa, wb = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("local", "ray"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
    assert [(r["worker"], r["servers"]) for r in s["rollout_workers"]] == [(0, [urls[0]]), (1, [urls[1]])]
    assert all(r["tokens"] > 0 for r in s["rollout_workers"])
    # each server loaded every version once: the start, the initial evaluation's (v0), v1 and v2
    assert [httpx.get(u.removesuffix("/v1") + "/posttrain/weights").json()["version"] for u in urls] == [4, 4]


@pytest.mark.ray
def test_a_server_killed_mid_run_stops_it_naming_the_worker_and_the_server(sft_policy, tmp_path, servers):
    """SIGKILL worker 1's server after the first step: the run stops with an error naming worker 1 and that
    server within seconds (a refused connection, no retries here), never waiting for the long timeouts."""
    (proc, url), run_dir, killed_at = servers[2], tmp_path / "run", []

    def kill_after_first_step():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _rows(run_dir):
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_after_first_step, daemon=True).start()
    try:
        with pytest.raises(ServiceError) as e:
            _grpo(sft_policy, run_dir, [servers[0][1], url], "launcher=ray", "ray.rollout_workers=2",
                  "train.max_steps=50", "rollout.server_retries=0", "ray.call_timeout_s=120", "ray.sync_timeout_s=120")
        assert killed_at and time.monotonic() - killed_at[0] < 30
        msg = str(e.value)
        assert re.search(r"rollout worker 1 \(pid \d+\)", msg) and url.removesuffix("/v1") in msg and "Fix:" in msg, msg
        assert 1 <= len(_rows(run_dir)) < 50
    finally:
        from posttrain.engines import ray_engine

        for engine in list(ray_engine._LIVE):  # the failed run's workers
            engine.close()


@pytest.mark.ray
def test_workers_asking_for_more_gpus_than_the_cluster_has_are_refused_at_once(tiny_path, cluster):
    """(vLLM workers on a cluster joined by ray.address, which the config check cannot see.) Ray would keep
    such workers pending until ray.call_timeout_s; the engine refuses before starting any."""
    import functools

    from posttrain.config import ModelConfig
    from posttrain.engines.ray_engine import RayRolloutEngine
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollouts.config import RayConfig, RolloutConfig
    from posttrain.rollouts.experience import local_engine

    make = functools.partial(local_engine, tokenizer=load_tokenizer(tiny_path), cfg=RolloutConfig())
    t0 = time.monotonic()
    with pytest.raises(ServiceError, match=r"ray.rollout_workers=2 x ray.gpus_per_worker=1 need 2 GPUs and the "
                                           r"Ray cluster has 0"):
        RayRolloutEngine(load_causal_lm(ModelConfig(name_or_path=tiny_path)), make, RayConfig(gpus_per_worker=1),
                         own_weights=True)
    assert time.monotonic() - t0 < 10


def _grpo_config(*overrides):
    from posttrain.algorithms.grpo import GRPOConfig

    return load_config(GRPOConfig, None, list(overrides))


def test_ray_server_and_vllm_refusals():
    """What cannot work with launcher=ray is refused at config time, naming the keys and the fix."""
    import torch

    with pytest.raises(ConfigError, match=r"ray.rollout_workers=3 workers its own servers from rollout.servers, "
                                          r"which lists 2") as e:
        _grpo_config("launcher=ray", "ray.rollout_workers=3", "rollout.engine=server",
                     "rollout.servers=[http://127.0.0.1:8001/v1, http://127.0.0.1:8002/v1]")
    assert e.value.where == "rollout.servers" and "ray.rollout_workers=2" in e.value.fix
    if not torch.cuda.is_available():  # the same error as launcher=local's, before any model loads
        with pytest.raises(ConfigError, match="rollout.engine=vllm needs a CUDA GPU, and none is visible"):
            _grpo_config("launcher=ray", "rollout.engine=vllm", "ray.gpus_per_worker=1")
    with pytest.raises(ConfigError, match="ray.gpus_per_worker=0 hides every GPU") as e:  # a cluster elsewhere
        _grpo_config("launcher=ray", "rollout.engine=vllm", "ray.address=auto")
    assert e.value.where == "ray.gpus_per_worker" and "ray.gpus_per_worker=1" in e.value.fix
    # accepted: more servers than workers (worker 0 fronts servers 0 and 2), vLLM workers with a GPU each
    _grpo_config("launcher=ray", "ray.rollout_workers=2", "rollout.engine=server",
                 "rollout.servers=[http://h:1/v1, http://h:2/v1, http://h:3/v1]")
    _grpo_config("launcher=ray", "rollout.engine=vllm", "ray.address=auto", "ray.gpus_per_worker=1")
