"""FSDP2 (train.strategy=fsdp, torch's fully_shard) on CPU: two real processes under torchrun (gloo),
checked against one process with the same global batch (sft, LoRA, dpo, kto, the reward model; the LM
head runs fused in the sharded root's forward); exact resume of a sharded run killed with
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


def losses(run_dir) -> list[float]:
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def summary(run_dir) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


CHECK = {"POSTTRAIN_CHECK_SHARDS": "1"}  # each rank's shards and buffers are compared with process 0's copy


def check_sharded_load(s: dict, name: str = "model") -> None:
    """summary.json's ``sharded_load``: process 0 read the checkpoint, process 1 built the model on meta (no
    weights, 0 bytes) and held half of it once filled from process 0; both hold exactly process 0's slices."""
    r0, r1 = s["sharded_load"][name]
    assert (r0["rank"], r0["built_on"], r1["rank"], r1["built_on"]) == (0, "cpu", 1, "meta")
    assert r1["param_bytes_before"] == 0
    assert 0.4 * r0["param_bytes_before"] < r1["param_bytes_after"] < 0.6 * r0["param_bytes_before"]
    assert all(r["shards_equal_rank0"] and r["buffers_equal_rank0"] for r in (r0, r1))


def test_fsdp_and_ddp_sft_match_one_process_and_the_gathered_model_loads(tmp_path):
    args = ["data.max_rows=64", "train.batch_size=8", "train.max_steps=3", "data.eval=null", *COMMON]
    one = run_cli("sft", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    two = torchrun("sft", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=2", "train.strategy=fsdp",
                   *args, env=CHECK)
    assert two.returncode == 0, two.stderr[-3000:]
    s = summary(tmp_path / "two")
    assert s["world_size"] == 2 and s["strategy"] == "fsdp"  # really sharded over two processes
    check_sharded_load(s)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    from posttrain.models.tiny import resolve

    init = load_file(str(Path(resolve("tiny")) / "model.safetensors"))
    assert max_diff(a, init) > 1e-3  # training moved the weights
    assert max_diff(a, b) < 1e-5
    loss_one, loss_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(loss_one) == 3 and loss_one == pytest.approx(loss_two, abs=1e-5)
    # the README's DDP command (torchrun, the default train.strategy=ddp): the same run again
    ddp = torchrun("sft", f"train.output_dir={tmp_path/'ddp'}", "train.micro_batch_size=2", *args, env=CHECK)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (summary(tmp_path / "ddp")["world_size"], summary(tmp_path / "ddp")["strategy"]) == (2, "ddp")
    assert max_diff(a, weights(tmp_path / "ddp")) < 1e-5 and losses(tmp_path / "ddp") == pytest.approx(loss_one, abs=1e-5)
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


# one process's micro-batch: DPO the whole global batch (accumulation and sharding equal one large batch);
# KTO the ranks' micro-batch, as its reference point z0 is a per-micro-batch mean; the reward model too:
# with the global batch, a few weights whose gradients are ~0 turn reduction-order noise into 1e-5 after
# two AdamW steps at lr 1e-3 (measured), identical with the ranks' micro-batches
@pytest.mark.parametrize("command,one_micro", [("dpo", 8), ("kto", 4), ("reward", 4)])
def test_fsdp_preference_matches_one_process(tmp_path, command, one_micro):
    args = ["data.max_rows=32", "train.batch_size=8", "train.max_steps=2", "eval_holdout=0",
            *(c for c in COMMON if command != "reward" or not c.startswith("task_eval"))]
    one = run_cli(command, f"train.output_dir={tmp_path/'one'}", f"train.micro_batch_size={one_micro}", *args)
    assert one.returncode == 0, one.stderr
    own_cache = [] if command == "reward" else [f"ref_cache_dir={tmp_path/'cache'}"]  # its own reference pass
    two = torchrun(command, f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=4", "train.strategy=fsdp",
                   *args, *own_cache, env=CHECK)
    assert two.returncode == 0, two.stderr[-3000:]
    s = summary(tmp_path / "two")
    assert s["world_size"] == 2 and s["strategy"] == "fsdp"
    check_sharded_load(s)
    if command != "reward":  # the reference pass ran on a sharded reference, built on meta on process 1 too
        check_sharded_load(s, "reference pass")
        assert s["reference_cache"]["cache"] == "miss" and s["reference_cache"]["loaded_reference"]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == 2 and a[0] != a[1] and a == pytest.approx(b, abs=1e-5)  # the first step moved the weights
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) < 1e-5


def test_lora_under_fsdp_matches_one_process(tmp_path):
    """The adapters train sharded with their frozen base; the gathered copy is a peft model again, so
    final/ holds the same adapter as one process's run."""
    args = ["data.max_rows=64", "train.batch_size=8", "train.max_steps=3", "data.eval=null", "lora.enabled=true",
            "lora.r=4", "lora.dropout=0", "train.lr=1e-3", *COMMON]  # dropout masks would differ per process
    one = run_cli("sft", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    two = torchrun("sft", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=2", "train.strategy=fsdp",
                   *args, env=CHECK)
    assert two.returncode == 0, two.stderr[-3000:]
    assert summary(tmp_path / "two")["strategy"] == "fsdp"
    check_sharded_load(summary(tmp_path / "two"))  # peft wrapped the empty model the same way
    a, b = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert a and max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-4  # the adapters trained
    assert max_diff(a, b) < 1e-5
    loss_one, loss_two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(loss_one) == 3 and loss_one == pytest.approx(loss_two, abs=1e-5)


def test_an_empty_build_is_the_loaded_module_on_meta(tmp_path):
    """What processes other than 0 build without reading weights (models.loading.empty_weights) is what process 0
    loads: the same layout (names, shapes, dtypes, ties, configs, generation config: what sharding.shard checks
    across ranks) for Llama and bf16 Qwen2, LoRA and a reward model; an adapter directory is refused."""
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.engines.sharding import _layout, is_empty
    from posttrain.errors import ConfigError
    from posttrain.models.heads import load_reward_model
    from posttrain.models.loading import empty_weights, load_policy

    lora = LoraConfig(enabled=True, r=4)
    for load in (lambda: load_policy(ModelConfig(name_or_path="tiny")),
                 lambda: load_policy(ModelConfig(name_or_path="tiny-qwen2", dtype="bfloat16"), lora),
                 lambda: load_reward_model(ModelConfig(name_or_path="tiny"), pad_token_id=0, lora=lora)):
        real = load()
        with empty_weights():
            empty = load()
        assert not is_empty(real) and all(p.is_meta for p in empty.parameters())
        assert _layout(empty) == _layout(real) and empty.training == real.training
    real.save_pretrained(tmp_path / "adapter")  # a peft model saves its adapter alone
    with empty_weights(), pytest.raises(ConfigError, match="adapter directory"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "adapter")))


def test_accelerate_deepspeed_and_fsdp_plugins_are_refused(tmp_path):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        out = run_cli("sft", f"train.output_dir={tmp_path/var}", "train.max_steps=1", "data.max_rows=8",
                      "train.batch_size=4", "train.micro_batch_size=4", *COMMON, env={var: "true"})
        assert out.returncode != 0 and var in out.stderr and "train.strategy=fsdp" in out.stderr
        assert "Traceback" not in out.stderr
