"""FSDP2 (train.strategy=fsdp, torch's fully_shard) on CPU: two real processes under torchrun (gloo),
checked against one process with the same global batch; exact resume of a sharded run killed with
SIGKILL; the gathered final model loads with from_pretrained and scores like the trained one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pt_helpers import run_cli, torchrun

pytestmark = pytest.mark.slow

COMMON = ["train.threads=1", "task_eval=false", "train.progress=false", "train.lr=1e-3", "train.log_every=1"]


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def test_fsdp_sft_matches_one_process_and_the_gathered_model_loads(tmp_path):
    args = ["data.max_rows=64", "train.batch_size=8", "train.max_steps=3", "data.eval=null", *COMMON]
    one = run_cli("sft", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    two = torchrun("sft", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=2", "train.strategy=fsdp", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    s = summary(tmp_path / "two")
    assert s["world_size"] == 2 and s["strategy"] == "fsdp"  # really sharded over two processes
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    from posttrain.models.tiny import resolve

    init = load_file(str(Path(resolve("tiny")) / "model.safetensors"))
    assert max_diff(a, init) > 1e-3  # training moved the weights
    assert max_diff(a, b) < 1e-5
    # the gathered model is an ordinary Hugging Face checkpoint that scores like the one-process model
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")(ids).logits
    assert (la - lb).abs().max().item() < 1e-4


def test_fsdp_run_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    args = ["data.max_rows=128", "train.batch_size=8", "train.micro_batch_size=2", "train.max_steps=6",
            "train.save_every=2", "data.eval=null", "train.strategy=fsdp", *COMMON]
    full = torchrun("sft", f"train.output_dir={tmp_path/'full'}", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    crash = torchrun("sft", f"train.output_dir={tmp_path/'crash'}", *args, env={"POSTTRAIN_FAULT_AT_STEP": "3"})
    assert crash.returncode != 0  # a rank was SIGKILLed at step 3
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert ckpts == ["step-2"] and (tmp_path / "crash" / "checkpoints" / "step-2" / "sharded").is_dir()
    assert not (tmp_path / "crash" / "final").exists()
    resumed = torchrun("sft", f"train.output_dir={tmp_path/'crash'}", *args, "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stdout + resumed.stderr
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "crash")) == 0.0


def test_fsdp_dpo_matches_one_process(tmp_path):
    args = ["data.max_rows=32", "train.batch_size=8", "train.max_steps=2", "eval_holdout=0", *COMMON]
    one = run_cli("dpo", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    two = torchrun("dpo", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=4", "train.strategy=fsdp", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert summary(tmp_path / "two")["world_size"] == 2
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5


def test_lora_under_fsdp_matches_one_process(tmp_path):
    """The adapters train sharded with their frozen base; the gathered copy is a peft model again, so
    final/ holds the same adapter as one process's run."""
    args = ["data.max_rows=64", "train.batch_size=8", "train.max_steps=3", "data.eval=null", "lora.enabled=true",
            "lora.r=4", "lora.dropout=0", "train.lr=1e-3", *COMMON]  # dropout masks would differ per process
    one = run_cli("sft", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    two = torchrun("sft", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=2", "train.strategy=fsdp", *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert summary(tmp_path / "two")["strategy"] == "fsdp"
    a, b = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert a and max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # the adapters trained
    assert max_diff(a, b) < 1e-5


def test_accelerate_deepspeed_and_fsdp_plugins_are_refused(tmp_path):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        out = run_cli("sft", f"train.output_dir={tmp_path/var}", "train.max_steps=1", "data.max_rows=8",
                      "train.batch_size=4", "train.micro_batch_size=4", *COMMON, env={var: "true"})
        assert out.returncode != 0 and var in out.stderr and "train.strategy=fsdp" in out.stderr
        assert "Traceback" not in out.stderr
