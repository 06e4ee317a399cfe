"""VLLMRolloutEngine on a real GPU (skipped without CUDA or vllm), plus the missing-vllm error on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from posttrain.engines.rollout import SamplingParams
from posttrain.errors import ModelError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_vllm_is_a_model_error():
    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    with pytest.raises(ModelError, match="vllm"):
        VLLMRolloutEngine("unused")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs CUDA and vllm")
def test_vllm_generate_logprobs_and_weight_sync(tiny_path):
    from transformers import AutoModelForCausalLM

    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine(tiny_path, dtype="float32", gpu_memory_utilization=0.2, max_model_len=256,
                               enforce_eager=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float32).cuda().eval()
    prompts = [[5, 6, 7, 8], [9, 10]]
    rolls = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=3, seed=0, stop_token_ids=[]))
    assert [r.prompt_ids for r in rolls] == [prompts[0]] * 3 + [prompts[1]] * 3
    for r in rolls:
        assert len(r.completion_ids) == len(r.logprobs) == 8 and r.finish_reason == "length"
        seq = torch.tensor([r.prompt_ids + r.completion_ids], device="cuda")
        with torch.no_grad():
            lp = model(seq).logits[0].float().log_softmax(-1)[len(r.prompt_ids) - 1:-1]
        ref = lp.gather(-1, torch.tensor(r.completion_ids, device="cuda")[:, None]).squeeze(1).cpu()
        assert torch.allclose(ref, torch.tensor(r.logprobs), atol=2e-3)

    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    before = [r.completion_ids for r in engine.generate(prompts, greedy)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(model)
    after = [r.completion_ids for r in engine.generate(prompts, greedy)]
    assert after != before
