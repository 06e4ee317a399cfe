"""Peak memory of a forward + backward at a real vocabulary (151,936 tokens) is bounded by the fused LM
head's block size, not by the batch: measured in a fresh subprocess (its own peak RSS), for two batch
sizes whose full [tokens, vocab] fp32 logits alone would be 0.6 GB and 2.5 GB."""

import json
import subprocess
import sys

import pytest

from pt_helpers import ROOT

WORKER = r"""
import json, resource, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from posttrain.logprobs import HEAD_BLOCK_ELEMENTS
from posttrain.models.forward import position_logps

V, H, N = 151936, 64, int(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
def step(n):
    ids = torch.randint(0, V, (1, n + 1))
    batch = {"input_ids": ids, "position_ids": torch.arange(n + 1)[None]}
    lp = position_logps(model, batch, torch.arange(n), ids[0, 1:])
    lp.sum().backward()
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: the warm-up allocates them
step(8)  # warm-up: weights' gradients exist, every kernel has run once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
step(N)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "block_bytes": HEAD_BLOCK_ELEMENTS * 4, "weight_bytes": V * H * 4}))
"""


@pytest.mark.parametrize("tokens", [1024, 4096])
def test_head_memory_is_bounded_by_the_block_not_the_batch(tokens):
    out = subprocess.run([sys.executable, "-c", WORKER, str(tokens)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    full_logits = tokens * 151936 * 4
    # the backward holds two fp32 blocks (logits, probabilities) and the fp32 head gradient [V, H];
    # everything else grows with tokens x hidden (64), not tokens x vocab
    bound = 2 * r["block_bytes"] + 2 * r["weight_bytes"] + tokens * 64 * 4 * 64 + 64 * 2**20
    assert r["growth"] < bound, (r, bound)
    assert bound < full_logits / 2  # the bound is far below what the logits alone would take
