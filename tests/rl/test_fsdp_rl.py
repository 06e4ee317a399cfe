"""GRPO, PPO, RLOO and REINFORCE under FSDP2 (two processes, gloo): each step all-gathers the model into a
whole copy on every process for sampling, π_old and (PPO) values, builds the rollout engine around it and
frees both; the update runs on the sharded model (the LM head fused in its root's forward). Same seeds,
same rollouts per process: the same run as DDP, to 1e-5."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pt_helpers import torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("command", ["grpo", "ppo", "grpo-lora", "rloo", "reinforce"])
def test_online_rl_under_fsdp_equals_ddp(sft_policy, tmp_path, command):
    """grpo-lora: the adapters train sharded, and the KL reference is the gathered copy with its adapters
    off (online RL trains without dropout by default, whose masks would be drawn per process). rloo and reinforce (the GRPO loop with their
    estimators and the KL, β = 0.05, in the reward against a replicated reference): 2 steps, to keep it cheap."""
    extra = {"ppo": ["value.shared_backbone=true", "rollout.group_size=2"], "grpo": ["rollout.group_size=4"],
             "grpo-lora": ["rollout.group_size=4", "lora.enabled=true", "lora.r=4", "kl.beta=0.05"],
             "rloo": ["rollout.group_size=2"], "reinforce": []}
    steps = 2 if command in ("rloo", "reinforce") else 3
    extra = extra[command]
    command, final = command.split("-")[0], ("adapter_model" if command.endswith("lora") else "model")
    args = [f"model.name_or_path={sft_policy}", "rollout.prompts_per_step=4", *extra,
            "rollout.max_new_tokens=12", f"train.max_steps={steps}", "task_eval_prompts=8", "task_eval_samples=1",
            "train.progress=false", "train.threads=1", "train.lr=1e-4", "train.log_every=1",
            "rollout.engine_dtype=model"]  # fp32 sampling: bf16 rounding would turn 1e-7 reduction-order noise into flipped tokens
    runs = {}
    for strategy in ("ddp", "fsdp"):
        out = torchrun(command, f"train.output_dir={tmp_path / strategy}", f"train.strategy={strategy}", *args,
                       env={"POSTTRAIN_CHECK_SHARDS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        summary = json.loads((tmp_path / strategy / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["strategy"] == strategy
        if strategy == "fsdp":  # process 1 built the model on meta (PPO's zeroed value head is all it made itself)
            r0, r1 = summary["sharded_load"]["model"]  # and holds exactly its slice of process 0's copy
            assert r1["built_on"] == "meta" and r1["param_bytes_before"] < 1e-3 * r0["param_bytes_before"]
            assert all(r["shards_equal_rank0"] and r["buffers_equal_rank0"] for r in (r0, r1))
        else:
            assert summary["sharded_load"] == {}  # DDP: every process loads the whole model, as before
        rows = [json.loads(r) for r in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        runs[strategy] = ([r for r in rows if "train/loss" in r],
                          load_file(str(tmp_path / strategy / "final" / f"{final}.safetensors")))
    (ddp_rows, a), (fsdp_rows, b) = runs["ddp"], runs["fsdp"]
    assert any(r["train/grad_norm"] > 0 for r in ddp_rows)  # a learning signal reached the weights
    assert len(ddp_rows) == steps
    for x, y in zip(ddp_rows, fsdp_rows, strict=True):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["train/loss"] == pytest.approx(y["train/loss"], abs=1e-5)
    if final == "model":
        init = load_file(str(Path(sft_policy) / "model.safetensors"))
        assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-5  # the policy moved
    else:
        assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-6  # the adapters moved
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
