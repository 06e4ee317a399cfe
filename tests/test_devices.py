"""Device placement without a GPU: the train engine hands every loss function its micro-batches on the
engine's device, and each trainer's loss runs with the model on another device than the CPU — the
``meta`` device, where any tensor a loss creates on the CPU and mixes with the model's outputs raises
"expected to be on the same device". So a path that would leave a batch (or a bookkeeping tensor) on the
CPU while the model sits on a GPU fails here first. The meta device has no values, so only losses with
no data-dependent shapes run there: the RL losses (GRPO, PPO with its value head). SFT and the preference
losses select their target positions with ``nonzero`` and are covered by the engine test (their batches
arrive on the engine's device) and by their shared forward, ``models.forward.position_logps``."""

import pytest
import torch

from posttrain.data.batching import AttentionLayout, collate, to_device
from posttrain.data.chat import encode_sft

META = torch.device("meta")


def on_meta(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.device.type == "meta"
    if isinstance(obj, AttentionLayout):
        return on_meta(obj.out) and all(on_meta(b.keys) for b in obj.buckets)
    if isinstance(obj, dict):
        return all(on_meta(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(on_meta(v) for v in obj)
    return True


def test_to_device_moves_tensors_layouts_and_nested_containers(tokenizer):
    exs = [encode_sft(tokenizer, {"prompt": f"Sort {i} 1", "completion": f"1 {i}"}, 64) for i in range(3)]
    batch = {"b": collate(exs, packing=True), "list": [torch.ones(2), (torch.zeros(1), 3)], "name": "x"}
    moved = to_device(batch, META)
    assert on_meta(moved) and moved["name"] == "x" and moved["list"][1][1] == 3
    assert isinstance(moved["b"]["attn_layout"], AttentionLayout)


def test_the_engine_gives_loss_functions_batches_on_its_device(tiny_model, tokenizer, tmp_path, monkeypatch):
    from posttrain.config import TrainConfig
    from posttrain.engines.train import TrainEngine

    engine = TrainEngine(tiny_model, TrainConfig(batch_size=2, micro_batch_size=2), 1, tmp_path)
    monkeypatch.setattr(TrainEngine, "device", property(lambda self: META))
    seen = []

    class Seen(Exception):
        pass

    def loss_fn(model, mb, total):
        seen.append(on_meta(mb))
        raise Seen

    exs = [encode_sft(tokenizer, {"prompt": "Sort 2 1", "completion": "1 2"}, 64)] * 2
    with pytest.raises(Seen):
        engine.step([collate(exs, packing=True)], loss_fn, lambda mb: torch.tensor(4.0))
    assert seen == [True]


@pytest.fixture
def meta_model(tiny_model):
    return tiny_model.to(META)


def _experience(T=4):
    from posttrain.rollouts.experience import Experience

    comps = [[20, 21, 22, 2], [30, 2], [40, 41, 42, 43], [50, 51, 2]]
    return Experience(prompts=["p"] * 4, prompt_ids=[[1, 5, 9, 12]] * 2 + [[3, 4]] * 2, completion_ids=comps,
                      texts=[""] * 4, finish=["stop"] * 4, group_size=2, scores=torch.zeros(4),
                      valid=torch.ones(4, dtype=torch.bool), components={},
                      mask=torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in comps]),
                      rollout_logp=-torch.rand(4, T), ref_logp=-torch.rand(4, T), old_logp=-torch.rand(4, T),
                      values=torch.rand(4, T), advantages=torch.randn(4, T), returns=torch.randn(4, T))


class _Coef:
    value = 0.1


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_grpo_loss_runs_on_the_models_device(meta_model, entropy_coef):
    from posttrain.algorithms.grpo import GRPOConfig, make_loss
    from posttrain.rollouts.online import pg_recipe

    cfg = GRPOConfig()
    cfg.loss.entropy_coef = entropy_coef
    loss_fn, _ = make_loss(pg_recipe(cfg), _Coef())
    mb = to_device(_experience().micro_batch([0, 1, 2, 3]), META)
    loss, metrics = loss_fn(meta_model, mb, torch.tensor(4.0, device=META))
    assert loss.device.type == "meta" and on_meta(metrics)


def test_ppo_loss_with_its_value_head_runs_on_the_models_device(meta_model):
    from posttrain.algorithms.ppo import ActorCritic, PPOConfig, make_loss
    from posttrain.rollouts.online import pg_recipe

    cfg = PPOConfig()
    head = torch.nn.Linear(meta_model.config.hidden_size, 1).to(META)
    loss_fn, _ = make_loss(cfg, pg_recipe(cfg), _Coef())
    mb = to_device(_experience().micro_batch([0, 1, 2, 3]), META)
    loss, metrics = loss_fn(ActorCritic(meta_model, v_head=head), mb, torch.tensor(4.0, device=META))
    assert loss.device.type == "meta" and on_meta(metrics)


def test_the_gpu_check_script_runs_its_path_on_the_cpu():
    """scripts/gpu_check.sh (the command docs/gpu.md gives) on the CPU, tiny model, two steps."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pt_helpers import ROOT

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--models", "tiny", "--algos", "sft,grpo", "--quick",
                          "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])["gpu_check"]
    assert [r["algo"] for r in runs] == ["sft", "grpo"] and all(r["tokens_per_s"] > 0 for r in runs)
