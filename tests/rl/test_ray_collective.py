"""ray.weight_sync=collective: the learner's weights reach the Ray rollout workers by a gloo broadcast over
a process group of the sender and the workers (posttrain/engines/weight_sync.py), on a local cluster.

Like tests/rl/test_ray.py these run only inside a private network namespace where loopback is the only
interface (``unshare -n bash -c 'ip link set lo up; pytest -m ray'``); elsewhere they are skipped.
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

COMMON = ["train.progress=false", "train.log_every=1", "task_eval_prompts=16", "task_eval_samples=4",
          "reward=builtin_correct"]
SMALL = ["rollout.prompts_per_step=8", "rollout.group_size=4", "train.max_steps=3", "train.lr=1e-4",
         "launcher=ray", "ray.rollout_workers=2"]
COLLECTIVE = ["ray.weight_sync=collective"]


cluster = pytest.fixture(scope="module", autouse=True)(local_ray_cluster)


def _train_rows(run_dir):
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/mean" in r]


def _grpo(sft_policy, out, *extra):
    from posttrain.algorithms.grpo import GRPOConfig, run

    return run(load_config(GRPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={out}",
                                              *COMMON, *extra]))


def _weights(run_dir):
    from safetensors.torch import load_file

    final = Path(run_dir) / "final"
    return load_file(str(final / "model.safetensors" if (final / "model.safetensors").exists()
                         else final / "adapter_model.safetensors"))


def _same_run(a_dir, b_dir, steps=3, weights_tol=1e-5):
    """The same samples at every step (rewards exact), losses and weights to the learner's own float noise:
    two identical runs in one test process can differ by ~1e-6 in a step-3 loss, whatever the weight sync
    (tests/rl/test_ray.py allows 1e-5 too); the workers' weights themselves are checked bit for bit by
    test_workers_sample_what_the_local_engine_samples_after_a_broadcast."""
    a, b = _train_rows(a_dir), _train_rows(b_dir)
    assert len(a) == len(b) == steps
    for x, y in zip(a, b):
        for k in ("reward/mean", "reward/std", "response/length_mean"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), k
        for k in ("train/loss", "kl"):
            assert x[k] == pytest.approx(y[k], abs=1e-5), k
    wa, wb = _weights(a_dir), _weights(b_dir)
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= weights_tol


def test_collective_equals_object_store(sft_policy, tmp_path):
    """Two workers: the broadcast over the group gives the object store's rewards, losses and weights."""
    _grpo(sft_policy, tmp_path / "store", *SMALL)
    _grpo(sft_policy, tmp_path / "group", *SMALL, *COLLECTIVE)
    _same_run(tmp_path / "store", tmp_path / "group")


def test_asynchronous_collective_equals_object_store(sft_policy, tmp_path):
    """Staleness 1: a broadcast waits for the step generating meanwhile, which the learner's next collect
    waits for anyway, so the rollouts have the same versions (lags 0, 1, 1) and the run is the same."""
    _grpo(sft_policy, tmp_path / "store", *SMALL, "async.max_staleness=1")
    _grpo(sft_policy, tmp_path / "group", *SMALL, "async.max_staleness=1", *COLLECTIVE)
    _same_run(tmp_path / "store", tmp_path / "group")
    assert [r["async/staleness_max"] for r in _train_rows(tmp_path / "group")] == [0, 1, 1]


def test_lora_adapters_reach_the_workers_over_the_group(sft_policy, tmp_path):
    """LoRA broadcasts the adapters only; the workers sample from the trained policy (the run equals the
    object-store one while the policy moves away from the start)."""
    lora = ["lora.enabled=true", "train.lr=3e-3"]
    _grpo(sft_policy, tmp_path / "store", *SMALL, *lora)
    _grpo(sft_policy, tmp_path / "group", *SMALL, *lora, *COLLECTIVE)
    # Adam at lr 3e-3 turns the learner's float noise in near-zero adapter gradients into ~1e-5 differences of
    # the adapters: two object-store runs in this test process differ by that much too
    _same_run(tmp_path / "store", tmp_path / "group", weights_tol=1e-4)
    assert _train_rows(tmp_path / "group")[-1]["kl"] > 0.05


def test_killed_workers_rejoin_a_new_group(sft_policy, tmp_path, monkeypatch):
    """SIGKILL a worker mid-run, twice: once while it generates (version 1), once just before a broadcast
    (version 2). Each time a new worker starts, the group forms again with it and it receives the current
    weights; every step has its full batch and the rewards of an uninterrupted run. Three steps: two
    identical runs in one test process can differ by ~1e-7 from step 2 on (in the learner, not the sync),
    which Adam amplifies until a sample flips a few steps later."""
    from posttrain.engines.ray_engine import RayRolloutEngine

    _grpo(sft_policy, tmp_path / "uninterrupted", *SMALL, *COLLECTIVE)
    killed = []
    submit, update = RayRolloutEngine.submit, RayRolloutEngine.update_weights

    def submit_then_kill(self, *a, **k):
        pending = submit(self, *a, **k)
        if self.version == 1 and not killed:
            killed.append(self.pids[0])
            os.kill(self.pids[0], signal.SIGKILL)
        return pending

    def kill_then_update(self, model, version=None):
        if version == 2 and len(killed) == 1:
            killed.append(self.pids[1])
            os.kill(self.pids[1], signal.SIGKILL)
        return update(self, model, version)

    monkeypatch.setattr(RayRolloutEngine, "submit", submit_then_kill)
    monkeypatch.setattr(RayRolloutEngine, "update_weights", kill_then_update)
    _grpo(sft_policy, tmp_path / "killed", *SMALL, *COLLECTIVE)
    assert len(killed) == 2
    rows, want = _train_rows(tmp_path / "killed"), _train_rows(tmp_path / "uninterrupted")
    assert len(rows) == 3 and all(r["batch/rollouts"] == 32 for r in rows)
    assert rows[-1]["async/restarts"] == 2
    assert [r["reward/mean"] for r in rows] == pytest.approx([r["reward/mean"] for r in want], abs=1e-6)
    assert [r["train/loss"] for r in rows] == pytest.approx([r["train/loss"] for r in want], abs=1e-5)


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
    engine = RayRolloutEngine(model, make, RayConfig(rollout_workers=2, weight_sync="collective", **cfg),
                              worker_cls or RolloutWorker)
    engine.local = make
    return engine, model


def _params():
    from posttrain.engines.rollout import SamplingParams

    return SamplingParams(max_new_tokens=4, n=2, seed=1, stop_token_ids=[])


def test_workers_sample_what_the_local_engine_samples_after_a_broadcast(tiny_path):
    engine, model = _engine(tiny_path)
    try:
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
        for version in (1, 2):  # a second version travels over the same group
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            engine.update_weights(model, version=version)
            got = engine.generate(prompts, _params())
            want = engine.local(model).generate(prompts, _params())
            assert [r.completion_ids for r in got] == [r.completion_ids for r in want]
            assert all(r.version == version for r in got)
        assert engine._sync.gen == 1
    finally:
        engine.close()


def test_a_worker_that_never_receives_stops_the_run_within_the_timeout(tiny_path):
    from posttrain.engines.ray_engine import RolloutWorker
    from posttrain.errors import ServiceError

    class Hangs(RolloutWorker):  # worker 1 joins the group but never takes part in the broadcast
        def receive(self, version, gen, layout):
            if self.index == 1:
                time.sleep(3600)
            return super().receive(version, gen, layout)

    engine, model = _engine(tiny_path, Hangs, sync_timeout_s=3.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match=r"rollout worker 1 \(pid \d+\) did not finish receiving weights "
                                               r"version 1 over the weight-sync group within ray.sync_timeout_s=3 s"):
            engine.update_weights(model, version=1)
            engine.generate([[5, 6, 7], [8, 9]], _params())
        assert time.monotonic() - t0 < 10
    finally:
        t0 = time.monotonic()
        engine.close()
        assert time.monotonic() - t0 < 10


def test_a_worker_that_never_joins_stops_the_run_within_the_timeout(tiny_path):
    from posttrain.engines.ray_engine import RolloutWorker
    from posttrain.errors import ServiceError

    class NeverJoins(RolloutWorker):
        def join(self, *args):
            if self.index == 0:
                time.sleep(3600)
            return super().join(*args)

    engine, model = _engine(tiny_path, NeverJoins, sync_timeout_s=3.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(ServiceError, match=r"rollout worker 0 \(pid \d+\) did not finish joining weight-sync "
                                               r"group generation 1 within ray.sync_timeout_s=3 s"):
            engine.update_weights(model, version=1)
        assert time.monotonic() - t0 < 10
    finally:
        engine.close()


def test_a_worker_that_dies_while_the_group_forms_is_replaced_at_once(tiny_path):
    """Worker 1 is SIGKILLed before it arrives at a group generation: worker 0, which arrived, is told the
    generation is abandoned (it does not wait for rank 2 until the timeout), a new worker starts and the
    next generation forms with it, well within ray.sync_timeout_s."""
    from posttrain.engines.ray_engine import RolloutWorker

    class SlowJoin(RolloutWorker):
        def join(self, host, port, gen, *args):
            if self.index == 1 and gen == 1:
                time.sleep(3600)
            return super().join(host, port, gen, *args)

    engine, model = _engine(tiny_path, SlowJoin, sync_timeout_s=60.0)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        killer = threading.Timer(2.0, os.kill, (engine.pids[1], signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        engine.update_weights(model, version=1)
        assert time.monotonic() - t0 < 30 and engine.restarts == 1 and engine._sync.gen == 2
        prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
        got, want = engine.generate(prompts, _params()), engine.local(model).generate(prompts, _params())
        assert [r.completion_ids for r in got] == [r.completion_ids for r in want]
    finally:
        engine.close()


def test_learner_group_with_collective_sync(sft_policy, tmp_path):
    """ray.learners=2: learner rank 0 (whose default group is the learners' DDP group) hosts the weight-sync
    group beside it; the run equals the object-store one."""
    from posttrain.algorithms.grpo import GRPOConfig, run
    from posttrain.engines.ray_learners import launch_learners

    for name, extra in (("store", []), ("group", COLLECTIVE)):
        cfg = load_config(GRPOConfig, None, [f"model.name_or_path={sft_policy}", f"train.output_dir={tmp_path / name}",
                                             *COMMON, *SMALL, "ray.learners=2", *extra])
        assert launch_learners(cfg, run)["world_size"] == 2
    _same_run(tmp_path / "store", tmp_path / "group")

