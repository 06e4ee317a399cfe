"""The training runtime: accumulation, exact resume after a real SIGKILL, non-finite loss, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms.sft import count_tokens, sft_loss
from posttrain.config import TrainConfig
from posttrain.data.batching import collate
from posttrain.data.chat import encode_sft
from posttrain.engines.train import TrainEngine
from posttrain.errors import TrainingError
from posttrain.tasks.builtin import sft_records

from pt_helpers import ROOT, run_cli


def one_step(model, exs, micro, packing, tmp_path, checkpointing=False):
    cfg = TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=micro, warmup_ratio=0.0, schedule="constant",
                      gradient_checkpointing=checkpointing)
    engine = TrainEngine(model, cfg, total_steps=1, run_dir=tmp_path)
    batches = [collate(exs[s:s + micro], packing=packing) for s in range(0, 8, micro)]
    grads, step = {}, engine.optimizer.step

    def capture(*args, **kw):  # the accumulated gradient the optimizer is about to apply
        grads.update({n: p.grad.clone() for n, p in engine.unwrapped.named_parameters() if p.grad is not None})
        return step(*args, **kw)

    engine.optimizer.step = capture
    metrics = engine.step(batches, sft_loss, count_tokens)
    return grads, metrics


@pytest.mark.parametrize("packing", [False, True])
def test_accumulation_4x2_equals_batch_8(tiny_path, tokenizer, tmp_path, packing):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm

    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(8, seed=5)]
    full, m_full = one_step(load_causal_lm(ModelConfig(name_or_path=tiny_path)), exs, 8, packing, tmp_path / "a")
    acc, m_acc = one_step(load_causal_lm(ModelConfig(name_or_path=tiny_path)), exs, 2, packing, tmp_path / "b")
    # compare the gradients themselves: Adam's first step divides by |g|, which amplifies float noise
    assert max(g.abs().max().item() for g in full.values()) > 1e-3  # a real gradient
    diff = max((full[n] - acc[n]).abs().max().item() for n in full)
    assert diff <= 1e-5
    # the micro-batch losses add up to the full-batch loss
    assert abs(m_full["loss"].item() - m_acc["loss"].item()) < 1e-5


def test_gradient_checkpointing_gives_the_same_gradient(tiny_path, tokenizer, tmp_path):
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.models.loading import apply_lora, load_causal_lm

    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(8, seed=5)]
    for lora in (False, True):
        grads = []
        for ckpt in (False, True):
            torch.manual_seed(0)  # the same LoRA initialisation in both runs
            model = load_causal_lm(ModelConfig(name_or_path=tiny_path))
            if lora:
                model = apply_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"], dropout=0.0))
            g, _ = one_step(model, exs, 4, True, tmp_path / f"{lora}{ckpt}", checkpointing=ckpt)
            grads.append(g)
            base = model.get_base_model() if lora else model
            assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules()) == ckpt
        assert grads[0].keys() == grads[1].keys() and grads[0]
        assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6, lora


def test_non_finite_loss_stops_with_message(tiny_model, tokenizer, tmp_path):
    cfg = TrainConfig(batch_size=2, micro_batch_size=2)
    engine = TrainEngine(tiny_model, cfg, total_steps=2, run_dir=tmp_path)
    exs = [encode_sft(tokenizer, r, 256) for r in sft_records(2)]
    before = {n: p.detach().clone() for n, p in engine.unwrapped.named_parameters()}

    def nan_loss(model, batch, n):
        loss, m = sft_loss(model, batch, n)
        return loss * float("nan"), m

    with pytest.raises(TrainingError, match="non-finite at step 1"):
        engine.step([collate(exs, packing=True)], nan_loss, count_tokens)
    after = dict(engine.unwrapped.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # update not applied


SFT_ARGS = ["data.max_rows=256", "train.batch_size=16", "train.micro_batch_size=8", "train.max_steps=8",
            "train.save_every=2", "train.threads=1", "train.log_every=1", "task_eval=false", "data.eval=null",
            "train.progress=false"]


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_bitwise(tmp_path):
    full = run_cli("sft", f"train.output_dir={tmp_path/'full'}", *SFT_ARGS)
    assert full.returncode == 0, full.stderr
    crash = run_cli("sft", f"train.output_dir={tmp_path/'crash'}", *SFT_ARGS,
                    env={"POSTTRAIN_FAULT_AT_STEP": "5"})
    assert crash.returncode == -9  # really killed
    ckpts = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]  # step 5 never checkpointed; no temp dirs left
    assert not (tmp_path / "crash" / "final").exists()
    resumed = run_cli("sft", f"train.output_dir={tmp_path/'crash'}", *SFT_ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "crash")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the metrics file reads like one uninterrupted run
    steps = [json.loads(r)["step"] for r in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(5) == 1


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    # Adam divides by |g|, so float-order noise in tiny gradients grows with lr x steps: keep both small
    args = ["data.max_rows=64", "train.batch_size=8", "train.max_steps=2", "train.threads=1",
            "task_eval=false", "data.eval=null", "train.progress=false", "train.lr=1e-3"]
    one = run_cli("sft", f"train.output_dir={tmp_path/'one'}", "train.micro_batch_size=8", *args)
    assert one.returncode == 0, one.stderr
    # the launcher that really starts 2 CPU processes (--cpu --num_processes 2 silently runs one)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "posttrain.cli", "sft", f"train.output_dir={tmp_path/'two'}", "train.micro_batch_size=4", *args]
    two = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2  # guard against launchers that silently run one process
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    from posttrain.models.tiny import resolve

    init = load_file(str(Path(resolve("tiny")) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # training moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
