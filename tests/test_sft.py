"""SFT on the built-in task learns: the held-out gold metric beats the untrained model by a margin;
LoRA adapters save, reload and merge; the tiny model round-trips through from_pretrained offline."""

import json
import os
import subprocess
import sys

import pytest
import torch

from posttrain.algorithms.sft import SFTConfig, run
from posttrain.config import load_config

from pt_helpers import ROOT


@pytest.mark.slow
def test_sft_improves_gold_metric(tmp_path):
    cfg = load_config(SFTConfig, None, [
        f"train.output_dir={tmp_path}", "train.progress=false", "train.epochs=2", "task_eval_prompts=48"])
    summary = run(cfg)
    before, after = summary["initial"], summary["final"]
    # an untrained model writes garbage (gold ≈ 0); the SFT model imitates the demonstrator (≈ 0.8)
    assert after["gold_reward"] > before["gold_reward"] + 0.4
    assert after["accuracy"] > 0.4 and after["token_accuracy"] > 0.9
    # and stays imperfect: the demonstrator's noise is imitated (room for RLHF)
    assert after["gold_reward"] < 0.95
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert all(0 <= r["padding_frac"] < 0.5 for r in rows if "padding_frac" in r)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "final" / "model.safetensors").exists()
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events written


def test_lora_adapter_saves_and_merges(tmp_path, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(SFTConfig, None, [
        f"train.output_dir={tmp_path}", "train.progress=false", "train.max_steps=3", "data.max_rows=64",
        "task_eval=false", "data.eval=null", "lora.enabled=true", "lora.r=4", "lora.merge_on_save=true",
        "train.lr=1e-2", "train.batch_size=16", "train.micro_batch_size=16"])
    run(cfg)
    final = tmp_path / "final"
    assert (final / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), final / "adapter")
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        m, a, b = merged(ids).logits, adapted(ids).logits, base(ids).logits
    assert torch.allclose(m, a, atol=1e-4)
    assert (m - b).abs().max() > 1e-4  # the adapter changed something


def test_tiny_model_round_trip_offline(tmp_path):
    code = f"""
import torch
from posttrain.models.tiny import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer
p = save_tiny(r"{tmp_path / 'tiny'}", arch="qwen2")
m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p)
ids = t.apply_chat_template([{{"role": "user", "content": "Sort the numbers 3 1 2."}}], add_generation_prompt=True, return_dict=True)["input_ids"]
assert t.decode(ids).endswith("<|im_start|>assistant\\n"), t.decode(ids)
n = sum(x.numel() for x in m.parameters())
assert 1e6 < n < 1e7, n
assert type(m).__name__ == "Qwen2ForCausalLM"
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
