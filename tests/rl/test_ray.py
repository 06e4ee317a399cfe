"""launcher=ray: rollout workers as Ray actors on a local cluster, synchronous and asynchronous.

Ray binds to the machine's network address whatever its options say, so these tests run only inside a
private network namespace where loopback is the only interface (scripts/test.sh runs them so:
``unshare -n bash -c 'ip link set lo up; pytest -m ray'``); elsewhere they are skipped and say why.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from pt_helpers import local_ray_cluster

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

COMMON = ["train.progress=false", "train.log_every=1", "task_eval_prompts=64", "task_eval_samples=4",
          "reward=builtin_correct"]


cluster = pytest.fixture(scope="module", autouse=True)(local_ray_cluster)


def _rows(run_dir):
    return [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_rows(run_dir):
    return [r for r in _rows(run_dir) if "reward/mean" in r]


def _grpo(sft_policy, out, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    return run(load_config(GRPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={out}",
                                              *COMMON, *extra]))


def _weights(run_dir):
    from safetensors.torch import load_file

    final = Path(run_dir) / "final"
    return load_file(str(final / "model.safetensors" if (final / "model.safetensors").exists()
                         else final / "adapter_model.safetensors"))


SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "train.max_steps=3", "train.lr=1e-4",
         "task_eval_prompts=16"]


@pytest.fixture(scope="module")
def local_small(sft_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    _grpo(sft_policy, out, *SMALL)
    return out


# metrics of the whole batch; across learner ranks only those that are means over equal shares are
# exact (a per-rank std or token-weighted mean, averaged over ranks, is not the batch's)
EXACT = ("reward/mean", "reward/std", "train/loss", "kl", "entropy", "response/length_mean")
PER_RANK_EXACT = ("reward/mean", "train/loss", "kl", "response/length_mean")


def _same_run(a_dir, b_dir, keys=EXACT, weights_tol=1e-5):
    a, b = _train_rows(a_dir), _train_rows(b_dir)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for k in keys:
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
        assert y["async/staleness_max"] == 0
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= weights_tol


def test_ray_synchronous_equals_local(sft_policy, tmp_path, local_small):
    """Two workers, max_staleness 0: the same rewards, losses and final weights as one process (each
    prompt has its own seed, so which worker samples it does not matter)."""
    s = _grpo(sft_policy, tmp_path, *SMALL, "launcher=ray", "ray.rollout_workers=2")
    _same_run(local_small, tmp_path)
    assert [r["worker"] for r in s["rollout_workers"]] == [0, 1] and all(r["tokens"] > 0 for r in s["rollout_workers"])


@pytest.mark.parametrize("command", ["rloo", "reinforce"])
def test_rloo_and_reinforce_on_ray_equal_local(sft_policy, tmp_path, command):
    """The other estimators of the GRPO loop on two Ray rollout workers: the same run as one process."""
    from posttrain.commands import COMMANDS, load_command

    cls, run = load_command(COMMANDS[command])
    small = [f"model.name_or_path={sft_policy}", *COMMON, *SMALL, "rollout.group_size=2"]
    run(load_config(cls, None, [*small, f"train.output_dir={tmp_path / 'local'}"]))
    run(load_config(cls, None, [*small, f"train.output_dir={tmp_path / 'ray'}", "launcher=ray",
                                "ray.rollout_workers=2"]))
    _same_run(tmp_path / "local", tmp_path / "ray")


def _group(sft_policy, out, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run
    from posttrain.engines.ray_learners import launch_learners

    cfg = load_config(GRPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={out}", *COMMON,
                                         *SMALL, "launcher=ray", "ray.rollout_workers=2", "ray.learners=2", *extra])
    return launch_learners(cfg, run)


def test_learner_group_of_ray_actors_equals_one_process(sft_policy, tmp_path, local_small):
    """ray.learners=2: two learner actors form one torch.distributed group (DDP), rank 0 drives the two
    rollout workers and the two reward workers that score both ranks' batches (GroupScorer), and the run
    equals the single-process one, which scores itself (rewards, losses, weights to 1e-5)."""
    s = _group(sft_policy, tmp_path, "ray.reward_workers=2", "ray.cpus_per_reward_worker=0.5",
               "ray.cpus_per_learner=0.5")  # the 4 CPUs of the test cluster
    assert s["world_size"] == 2 and s["strategy"] == "ddp"
    assert [r["scored"] for r in s["reward_workers"]] == [3 * 32 // 2] * 2  # every rank's completions, 3 steps
    _same_run(local_small, tmp_path, PER_RANK_EXACT)


def test_fsdp_learner_group_equals_torchrun(sft_policy, tmp_path):
    """train.strategy=fsdp in a Ray learner group is the FSDP2 run torchrun gives, number for number
    (FSDP2 itself differs from one process by its reduction order, ~1e-5: tests/rl/test_fsdp_rl.py)."""
    from pt_helpers import torchrun

    s = _group(sft_policy, tmp_path / "ray", "train.strategy=fsdp")
    assert s["world_size"] == 2 and s["strategy"] == "fsdp"
    out = torchrun("grpo", f"model.name_or_path={sft_policy}", f"train.output_dir={tmp_path / 'torchrun'}",
                   *COMMON, *SMALL, "train.strategy=fsdp")
    assert out.returncode == 0, out.stderr[-3000:]
    _same_run(tmp_path / "torchrun", tmp_path / "ray", PER_RANK_EXACT)


def test_lora_adapters_reach_the_workers(sft_policy, tmp_path):
    """LoRA sends only the adapters, and the workers sample from the trained policy: the run equals the
    local one (whose engine samples from the trained model itself) while the policy moves away from the
    start (an adapter that never reached a worker would sample from the initial policy)."""
    lora = ["lora.enabled=true", "train.lr=3e-3"]
    _grpo(sft_policy, tmp_path / "local", *SMALL, *lora)
    _grpo(sft_policy, tmp_path / "ray", *SMALL, *lora, "launcher=ray", "ray.rollout_workers=2")
    # the same samples and losses at every step; Adam at lr 3e-3 turns float noise in near-zero adapter
    # gradients into ~1e-5 differences of the adapters themselves
    _same_run(tmp_path / "local", tmp_path / "ray", weights_tol=1e-4)
    assert _train_rows(tmp_path / "ray")[-1]["kl"] > 0.05


def test_ppo_on_ray_asynchronous(sft_policy, tmp_path):
    """PPO (its actor-critic's policy sampled by the workers) with staleness 1."""
    from posttrain.algorithms.ppo import PPOConfig, run

    s = run(load_config(PPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={tmp_path}",
                                          *COMMON, *SMALL, "launcher=ray", "ray.rollout_workers=2",
                                          "async.max_staleness=1"]))
    lags = [r["async/staleness_max"] for r in _train_rows(tmp_path)]
    assert lags == [0, 1, 1] and s["launcher"] == "ray" and (tmp_path / "value").exists()


def test_multi_turn_episodes_on_ray_workers(tiny_path, tmp_path):
    """Episodes advance turn by turn through the Ray workers like through the local engine."""
    _grpo(tiny_path, tmp_path / "ray", "rollout.prompts=builtin:tool_prompts", "rollout.environment=builtin:calc",
          "reward=[]", "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=8",
          "rollout.max_episode_tokens=24", "train.max_steps=2", "task_eval_prompts=4", "task_eval_samples=1",
          "launcher=ray", "ray.rollout_workers=2")
    _grpo(tiny_path, tmp_path / "local", "rollout.prompts=builtin:tool_prompts", "rollout.environment=builtin:calc",
          "reward=[]", "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=8",
          "rollout.max_episode_tokens=24", "train.max_steps=2", "task_eval_prompts=4", "task_eval_samples=1")
    a, b = _train_rows(tmp_path / "local"), _train_rows(tmp_path / "ray")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for k in ("episode/turns", "episode/tool_calls", "episode/masked_frac", "reward/mean", "train/loss"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), k


def test_learner_group_needs_its_launcher(sft_policy, tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="ray.learners=2 runs the learners as Ray actors"):
        _grpo(sft_policy, tmp_path, *SMALL, "launcher=ray", "ray.learners=2")


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_async_grpo_raises_heldout_accuracy(sft_policy, tmp_path, k):
    """Bounded staleness k: the workers sample steps t+1..t+k while step t trains; the rollouts are at
    most k versions old, corrected by the rollout log-probs (TIS), and GRPO still learns by the margin
    the local learning test asserts (tests/rl/test_learning.py)."""
    s = _grpo(sft_policy, tmp_path, "rollout.prompts_per_step=32", "rollout.group_size=8", "train.max_steps=20",
              "train.lr=1e-4", "launcher=ray", "ray.rollout_workers=2", f"async.max_staleness={k}")
    assert s["final"]["accuracy"] > s["initial"]["accuracy"] + 0.06, (s["initial"], s["final"])
    rows = _train_rows(tmp_path)
    lags = [r["async/staleness_max"] for r in rows]
    assert lags[:k + 1] == list(range(k + 1)) and set(lags[k:]) == {k}, lags  # the pipeline fills, then k
    assert all("tis/capped_frac" in r and "logprob_gap" in r for r in rows)
    assert max(r["logprob_gap"] for r in rows[k:]) > 0  # stale rollouts differ from the learner's policy


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the field after the state; a name may hold ") "


def _ours(pid: int) -> bool:
    """Whether ``pid`` descends from this test process (its Ray cluster's raylet starts the workers), not
    from another Ray job on the same machine."""
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = _parent(pid)
    return False


def _worker_pids() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if b"ray::RolloutWorker" in Path(f"/proc/{d}/cmdline").read_bytes() and _ours(int(d)):
                    pids.append(int(d))
            except (OSError, ValueError):  # the process ended while being read
                continue
    return pids


SIX = ["rollout.prompts_per_step=8", "rollout.group_size=4", "train.max_steps=6", "train.lr=1e-4",
       "task_eval_prompts=16", "launcher=ray", "ray.rollout_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted(sft_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _grpo(sft_policy, out, *SIX)
    return _train_rows(out)


def _count(path: Path, key: str) -> int:
    return sum(1 for r in path.read_text().splitlines() if key in r) if path.exists() else 0


def test_killed_worker_is_replaced_and_no_prompt_is_lost(sft_policy, tmp_path, uninterrupted):
    """SIGKILL one worker mid-run: the controller starts a new one and sends its prompts again; every
    step has its full batch, and the rewards equal those of a run that was never interrupted."""
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline:
            if _count(tmp_path / "metrics.jsonl", '"reward/mean"') >= 2 and (pids := _worker_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    _grpo(sft_policy, tmp_path, *SIX)
    t.join()
    assert killed, "the worker was never killed"
    rows = _train_rows(tmp_path)
    assert len(rows) == 6 and all(r["batch/rollouts"] == 32 for r in rows)
    assert rows[-1]["async/restarts"] == 1
    assert [r["reward/mean"] for r in rows] == pytest.approx([r["reward/mean"] for r in uninterrupted], abs=1e-6)


def test_sigkilled_controller_resumes_at_its_checkpoint(sft_policy, tmp_path, uninterrupted):
    """SIGKILL the controller after its step-2 checkpoint; `train.resume=true` continues from step 2 with
    the data position and policy version it stored: steps 3-6 equal the uninterrupted run's."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "posttrain.cli", "grpo", f"model.name_or_path={sft_policy}",
           f"train.output_dir={tmp_path}", *COMMON, *SIX, "train.save_every=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (tmp_path / "checkpoints" / "step-2").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the controller and the Ray processes it started
        proc.wait()
    assert _count(tmp_path / "metrics.jsonl", '"reward/mean"') < 6
    out = subprocess.run([*cmd, "train.resume=true"], capture_output=True, text=True, timeout=600,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "from step 2" in out.stdout + out.stderr
    rows = _train_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # nothing lost or counted twice
    assert [r["reward/mean"] for r in rows] == pytest.approx([r["reward/mean"] for r in uninterrupted], abs=1e-6)
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train/loss"] for r in uninterrupted], abs=1e-5)


def _engine(tiny_path, worker_cls=None, **cfg):
    import functools

    from posttrain.config import ModelConfig
    from posttrain.engines.ray_engine import RayRolloutEngine, RolloutWorker
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.rollouts.config import RayConfig, RolloutConfig
    from posttrain.rollouts.experience import local_engine

    tok = load_tokenizer(tiny_path)
    model = load_causal_lm(ModelConfig(name_or_path=tiny_path))
    make = functools.partial(local_engine, tokenizer=tok, cfg=RolloutConfig(engine_dtype="model"))
    engine = RayRolloutEngine(model, make, RayConfig(rollout_workers=2, **cfg), worker_cls or RolloutWorker)
    engine.local = make  # the same engine in this process
    return engine, model


def _params():
    from posttrain.engines.rollout import SamplingParams

    return SamplingParams(max_new_tokens=4, n=2, seed=1, stop_token_ids=[])


def test_weights_that_never_reach_a_worker_stop_the_run_within_the_timeout(tiny_path):
    from posttrain.engines.ray_engine import RolloutWorker
    from posttrain.errors import ServiceError

    class Hangs(RolloutWorker):  # the weight load of worker 1 never finishes
        def load(self, version, weights):
            if self.index == 1:
                time.sleep(3600)
            return super().load(version, weights)

    engine, model = _engine(tiny_path, Hangs, sync_timeout_s=3.0)
    try:
        engine.update_weights(model, version=1)
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match=r"rollout worker 1 \(pid \d+\) did not finish loading weights "
                                               r"version 1 within ray.sync_timeout_s=3 s"):
            engine.generate([[5, 6, 7], [8, 9]], _params())
        assert time.monotonic() - t0 < 10
    finally:
        engine.close()


def test_a_worker_never_samples_with_older_weights_than_asked(tiny_path):
    from posttrain.engines.ray_engine import RolloutWorker
    from posttrain.errors import ServiceError

    class Drops(RolloutWorker):  # acknowledges the load but keeps its old weights
        def load(self, version, weights):
            return version

    engine, model = _engine(tiny_path, Drops)
    try:
        engine.update_weights(model, version=3)
        with pytest.raises(ServiceError, match="holds weights version -1 but was asked to sample with version 3"):
            engine.generate([[5, 6, 7], [8, 9]], _params())
    finally:
        engine.close()


def test_workers_sample_what_the_local_engine_samples_after_a_weight_update(tiny_path):
    """Weights sent as a version reach the workers: their samples equal the local engine's on the
    updated model, prompt by prompt."""
    engine, model = _engine(tiny_path)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        engine.update_weights(model, version=1)
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
        got = engine.generate(prompts, _params())
        want = engine.local(model).generate(prompts, _params())
        assert [r.completion_ids for r in got] == [r.completion_ids for r in want]
        assert all(r.version == 1 for r in got)
        assert {r["worker"] for r in engine.worker_table()} == {0, 1}
    finally:
        engine.close()
