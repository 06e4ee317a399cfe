"""launcher=ray with ray.reward_workers: rewards scored by Ray actors that build them themselves.

Like tests/rl/test_ray.py these run only in a private network namespace where loopback is the only
interface (``unshare -n bash -c 'ip link set lo up; pytest -m ray ...'``); elsewhere they are skipped.
"""

import functools
import json
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.config import load_config
from pt_helpers import local_ray_cluster
from posttrain.errors import ConfigError, DataError, ServiceError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

COMMON = ["train.progress=false", "train.log_every=1", "task_eval_prompts=16", "task_eval_samples=4",
          "rollout.prompts_per_step=8", "rollout.group_size=4", "train.lr=1e-4", "launcher=ray",
          "ray.rollout_workers=2"]
THREE = [*COMMON, "reward=builtin_correct", "train.max_steps=3"]
# Two launcher=ray runs of one config land in one of two float outcomes, with reward workers or without (on
# this machine 2 runs in 9 took the rarer one, once with ray.reward_workers=0): the same samples and rewards, losses
# 1e-8 apart at step 2 and up to ~5e-6 at step 3 (the weights 3e-7), and a flipped sample by step 4. So three
# steps; rewards compared to 1e-6, loss-side metrics to 1e-5 (as tests/rl/test_ray.py; grad norm 1e-4 of
# itself), weights to 1e-6.
SCORED = ("reward/", "response/", "batch/")


cluster = pytest.fixture(scope="module", autouse=True)(local_ray_cluster)  # 2 rollout + 2 reward workers


def _grpo(policy, out, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    return run(load_config(GRPOConfig, None, [f"model.name_or_path={policy}", f"train.output_dir={out}", *extra]))


def _train_rows(run_dir):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _timing(key: str) -> bool:  # wall-clock metrics differ from run to run
    return key.endswith("_s") or key.endswith("per_s") or key in ("time", "elapsed")


@pytest.fixture(scope="module")
def learner_scored(sft_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("learner_scored")
    _grpo(sft_policy, out, *THREE)
    return out


def test_reward_workers_score_what_the_learner_scores(sft_policy, tmp_path, learner_scored):
    """ray.reward_workers=2: every metric of every step (rewards, their components, losses, KL) and the
    final weights equal the run whose learner scores itself (most runs bit for bit; see THREE)."""
    s = _grpo(sft_policy, tmp_path, *THREE, "ray.reward_workers=2")
    a, b = _train_rows(learner_scored), _train_rows(tmp_path)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert "reward/builtin_correct" in y and y["reward_s"] > 0
        for k in x:
            if not _timing(k):
                rel, tol = (1e-6, 1e-6) if k.startswith(SCORED) else (1e-4, 1e-5)  # 1e-4: train/grad_norm ~3
                assert y[k] == pytest.approx(x[k], rel=rel, abs=tol, nan_ok=True), k
        assert y["async/reward_restarts"] == 0
    wa, wb = _weights(learner_scored), _weights(tmp_path)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    table = s["reward_workers"]
    assert [r["worker"] for r in table] == [0, 1] and [r["scored"] for r in table] == [48, 48]  # 3 steps x 32 / 2
    assert all(r["pid"] > 0 and r["busy_s"] > 0 for r in table)  # each scored its share
    assert json.loads((tmp_path / "summary.json").read_text())["reward_workers"] == table


def test_killed_reward_worker_is_replaced_and_its_share_scored_again(sft_policy, tmp_path, learner_scored):
    """SIGKILL a reward worker after the first step: a new one takes its place, its share is scored
    again, and every step's rewards equal those of the run whose learner scored them."""
    from posttrain.engines.ray_rewards import _LIVE

    killed = []

    def killer():  # this run's worker by the pid its client got (a /proc scan would find other runs' too)
        deadline = time.time() + 300
        metrics = tmp_path / "metrics.jsonl"
        while time.time() < deadline:
            pids = [p for c in list(_LIVE) for p in c.pids if p]
            if pids and metrics.exists() and '"reward/mean"' in metrics.read_text():
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    s = _grpo(sft_policy, tmp_path, *THREE, "ray.reward_workers=2")
    t.join()
    assert killed, "the reward worker was never killed"
    rows, want = _train_rows(tmp_path), _train_rows(learner_scored)
    assert len(rows) == 3 and all(r["batch/rollouts"] == 32 for r in rows)
    assert rows[-1]["async/reward_restarts"] == 1 and rows[-1]["async/restarts"] == 0
    for k in ("reward/mean", "reward/std", "reward/builtin_correct"):
        assert [r[k] for r in rows] == pytest.approx([r[k] for r in want], abs=1e-6), k
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train/loss"] for r in want], abs=1e-5)
    assert sum(r["scored"] for r in s["reward_workers"]) == 3 * 32  # a share scored again counts once
    assert killed[0] not in [r["pid"] for r in s["reward_workers"]]


def _close_live():
    """An error leaves its run's workers (the next run would end them): end them here."""
    from posttrain.engines import ray_engine, ray_rewards

    for c in [*ray_rewards._LIVE, *ray_engine._LIVE]:
        c.close()


def test_a_reward_that_hangs_stops_the_run_naming_the_reward_worker(sft_policy, tmp_path):
    started = tmp_path / "started"
    hang = tmp_path / "hang.py"
    hang.write_text(textwrap.dedent(f"""
        import os, time

        def hang(prompts, completions, **columns):
            if os.getpid() != {os.getpid()}:  # in a reward worker (the learner never scores here)
                if not os.path.exists({str(started)!r}):
                    open({str(started)!r}, "w").write(str(time.time()))
                time.sleep(3600)
            return [0.0] * len(prompts)
    """))
    try:
        with pytest.raises(ServiceError, match=r"reward worker [01] \(pid \d+\) did not finish scoring 16 "
                                               r"completions for RL step 1 within ray.call_timeout_s=10 s"):
            _grpo(sft_policy, tmp_path / "run", *COMMON, "train.max_steps=2", f"reward=[builtin_correct,{hang}:hang]",
                  "ray.reward_workers=2", "ray.call_timeout_s=10")
        assert time.time() - float(started.read_text()) < 10 + 15
    finally:
        _close_live()


@pytest.mark.parametrize("extra, match", [
    (["launcher=local"], "ray.reward_workers=2 are Ray actors, and launcher is local"),
    (["rollout.prompts=builtin:tool_prompts", "rollout.environment=builtin:calc", "reward=[]"],
     "the environment gives the reward; reward workers would have nothing to score"),
])
def test_what_reward_workers_refuse(tiny_path, tmp_path, extra, match):
    from posttrain.algorithms.grpo import GRPOConfig

    with pytest.raises(ConfigError, match=match) as e:
        load_config(GRPOConfig, None, [f"model.name_or_path={tiny_path}", f"train.output_dir={tmp_path}",
                                       *COMMON, "ray.reward_workers=2", *extra])
    assert e.value.where == "ray.reward_workers"


# ----------------------------------------------------------------------------- the client alone

COUNTING = '''
class Parity:
    """Scores 1 for an even-length completion, None where the row says skip; counts its outcomes."""
    name = "parity"

    def __init__(self):
        self.last_stats = {}

    def __call__(self, prompts, completions, skip, **columns):
        self.last_stats = {"even": 0, "odd": 0, "skipped": 0}
        out = []
        for c, s in zip(completions, skip):
            key = "skipped" if s else "even" if len(c) % 2 == 0 else "odd"
            self.last_stats[key] += 1
            out.append(None if s else float(len(c) % 2 == 0))
        return out
'''


def test_split_and_merge():
    from posttrain.engines.ray_rewards import merge, split

    assert split(5, 2) == [(0, 0, 2), (1, 2, 5)] and split(1, 3) == [(1, 0, 1)] and split(0, 2) == []
    assert merge([{"a": [1, None], "b": [0, 0]}, {"a": [3], "b": [1]}], [2, 1]) == {"a": [1, None, 3], "b": [0, 0, 1]}
    with pytest.raises(DataError, match="reward 'a' returned 1 values for 2 completions"):
        merge([{"a": [1]}, {"a": [3]}], [2, 1])
    with pytest.raises(ServiceError, match="different rewards"):
        merge([{"a": [1]}, {"b": [3]}], [1, 1])


def test_reward_workers_return_the_learners_raw_components_and_counts(tmp_path):
    """Three workers on seven completions (uneven shares, row columns split with them, None kept): the
    raw components and the outcome counts of the whole batch equal one local call."""
    from posttrain.engines.ray_rewards import RayRewardWorkers, score_components
    from posttrain.rewards.combine import load_rewards
    from posttrain.rollouts.config import RayConfig

    (tmp_path / "parity.py").write_text(COUNTING)
    specs = [f"{tmp_path}/parity.py:Parity", "exact_match"]
    build = functools.partial(load_rewards, specs, [1.0, 0.5])
    texts = ["a", "bb", "ccc", "dddd", "", "ff", "ggggggg"]
    prompts = [f"p{i}" for i in range(7)]
    columns = {"skip": [False, True, False, False, False, True, False],
               "answer": ["a", "x", None, "dddd", "", "1", "g"]}
    local = build()
    want = score_components(local, prompts, texts, columns)
    client = RayRewardWorkers(build, RayConfig(reward_workers=3, call_timeout_s=120))
    try:
        got = client(prompts, texts, columns, step=0)
        assert got == want and got["parity"][1] is None and got["exact_match"][:3] == [1.0, 0.0, None]
        assert client.last_stats["parity"] == local[0][1].last_stats == {"even": 2, "odd": 3, "skipped": 2}
        assert [r["scored"] for r in client.worker_table()] == [2, 3, 2]
    finally:
        client.close()
    assert client.workers == [None, None, None]


def test_a_reward_model_loads_in_each_worker(reward_model):
    """rm:PATH: what is sent to a worker is the builder (the config's specs), not the model; each worker
    loads the reward model itself and scores its share as the learner's copy scores it."""
    import cloudpickle

    from posttrain.engines.ray_rewards import RayRewardWorkers, score_components
    from posttrain.rewards.combine import load_rewards
    from posttrain.rollouts.config import RayConfig

    build = functools.partial(load_rewards, [f"rm:{reward_model}"], [])
    assert len(cloudpickle.dumps(build)) < 2000
    prompts = ["What is 2 + 3?", "What is 7 + 1?", "What is 4 + 4?", "What is 9 + 0?", "What is 1 + 1?"]
    texts = ["5", "The answer is 8", "9", "9", "two"]
    want = score_components(build(), prompts, texts, {})
    client = RayRewardWorkers(build, RayConfig(reward_workers=2, call_timeout_s=120))
    try:
        got = client(prompts, texts, {}, step=3)
        assert list(got) == ["rm"] and got["rm"] == pytest.approx(want["rm"], abs=1e-5)
        assert len(set(got["rm"])) > 1  # a real model's scores, not a constant
    finally:
        client.close()
