"""Peak memory of a forward + backward at a real vocabulary (151,936 tokens) is bounded by the fused LM
head's block size, not by the batch: measured in a fresh subprocess (its own peak resident memory), for two
batch sizes whose full [tokens, vocab] fp32 logits alone would be 0.6 GB and 2.5 GB; and the same with two
processes (gloo, one torchrun launch) under FSDP2 and then DDP, where the head runs fused after the sharded
root's or the DDP wrapper's own forward: the model's own head computes logits for no position."""

import json
import shutil
import subprocess
import sys

import pytest

from pt_helpers import _CXX_ABORT, ROOT, free_port

WORKER = r"""
import gc, json, re, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain.logprobs import HEAD_BLOCK_ELEMENTS
from posttrain.models.forward import position_logps

V, H, N, out_dir = 151936, 64, int(sys.argv[1]), sys.argv[2]
strategies = sys.argv[3:] or ["single"]
rank = 0
if strategies != ["single"]:  # under torchrun: the wrappers train.strategy=fsdp / ddp put around the model
    import torch.distributed as dist
    from posttrain.engines.sharding import shard
    dist.init_process_group("gloo")
    assert dist.get_world_size() == 2
    rank = dist.get_rank()


def peak():  # this process's peak resident memory (VmHWM) since the last reset
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024


for strategy in strategies:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    rows = []  # positions the model's own head made logits for
    model.lm_head.register_forward_hook(lambda m, i, out: rows.append(out.shape[-2]))
    if strategy == "fsdp":
        shard(model, torch.device("cpu"))
    elif strategy == "ddp":  # as accelerate wraps it on CPU (no DDP options)
        model = torch.nn.parallel.DistributedDataParallel(model)

    def step(n):
        ids = torch.randint(0, V, (1, n + 1))
        batch = {"input_ids": ids, "position_ids": torch.arange(n + 1)[None]}
        lp = position_logps(model, batch, torch.arange(n), ids[0, 1:])
        lp.sum().backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: the warm-up allocates them

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the memory resident now (not the previous strategy's)
    for _ in range(2):  # warm-up: weights' gradients exist, every kernel has run, DDP has rebuilt its buckets
        step(8)
    before = peak()
    step(N)
    with open(f"{out_dir}/{strategy}-{rank}.json", "w") as f:  # a file each: the ranks' stdout lines can interleave
        json.dump({"growth": peak() - before, "block_bytes": HEAD_BLOCK_ELEMENTS * 4, "weight_bytes": V * H * 4,
                   "head_rows": max(rows, default=0), "strategy": strategy, "wrapper": type(model).__name__}, f)
    del model, step
    gc.collect()
"""

WRAPPER = {"single": "LlamaForCausalLM", "fsdp": "FSDPLlamaForCausalLM", "ddp": "DistributedDataParallel"}


def _measure(tokens: int, distributed: bool, tmp_path) -> list[dict]:
    """Each process's result: one in one process; with ``distributed`` one per process and strategy (FSDP2,
    then DDP, in one torchrun launch)."""
    (tmp_path / "worker.py").write_text(WORKER)
    results = tmp_path / "results"

    def launch():
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir()
        cmd = [sys.executable, str(tmp_path / "worker.py"), str(tokens), str(results)]
        if distributed:
            cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), str(tmp_path / "worker.py")]
            cmd += ["fsdp", "ddp"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                              env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})

    out = launch()
    if distributed and out.returncode and _CXX_ABORT in out.stderr:  # a rank's rare C++ abort: see pt_helpers.torchrun
        out = launch()
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(f.read_text()) for f in sorted(results.glob("*.json"))]


@pytest.mark.parametrize("tokens,distributed", [(1024, False), (4096, False), (1024, True)])
def test_head_memory_is_bounded_by_the_block_not_the_batch(tokens, distributed, tmp_path):
    results = _measure(tokens, distributed, tmp_path)
    assert sorted(r["strategy"] for r in results) == (["ddp", "ddp", "fsdp", "fsdp"] if distributed else ["single"])
    full_logits = tokens * 151936 * 4
    for r in results:
        assert r["wrapper"] == WRAPPER[r["strategy"]]  # really sharded / wrapped for DDP
        assert r["head_rows"] == 0  # the fused head took every position
        # the backward holds two fp32 blocks (logits, probabilities) and the fp32 head gradient [V, H];
        # everything else grows with tokens x hidden (64), not tokens x vocab
        bound = 2 * r["block_bytes"] + 2 * r["weight_bytes"] + tokens * 64 * 4 * 64 + 64 * 2**20
        assert r["growth"] < bound, (r, bound)
        assert bound < full_logits / 2  # the bound is far below what the logits alone would take
