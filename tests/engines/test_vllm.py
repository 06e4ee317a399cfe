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


class _RecordingLLM:
    """Stands in for ``vllm.LLM`` to check the order of sleep-mode calls the engine makes (vLLM itself needs a
    GPU; the GPU test below runs the real one). It also knows what vLLM's sleep discards: a level-2 sleep
    leaves the weights as garbage until something is loaded into them."""

    def __init__(self, model, **kwargs):
        self.kwargs, self.calls, self.weights_ok = kwargs, [], True

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.weights_ok = level == 1

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, fn, args):
        self.calls.append(("load",))
        self.weights_ok = True

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, sps, use_tqdm):
        assert self.weights_ok, "sampled from discarded weights"
        self.calls.append(("generate",))
        out = type("C", (), {"token_ids": [1], "logprobs": [{1: type("L", (), {"logprob": -0.5})()}],
                             "finish_reason": "length", "stop_reason": None})()
        return [type("O", (), {"outputs": [out]})() for _ in prompts]


@pytest.fixture()
def recording_vllm(monkeypatch):
    import sys
    import types

    module = types.SimpleNamespace(LLM=_RecordingLLM, SamplingParams=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return module


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_mode_frees_the_gpu_between_generations_and_wakes_weights_before_the_kv_cache(recording_vllm, level):
    """rollout.vllm_sleep: sleep after every generation; an update wakes the weights alone and loads them, and
    only the next generation wakes the KV cache. Level 2 discards the weights: generating again without an
    update is refused, not sampled from freed memory."""
    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine("unused", sleep=level, gpu_memory_utilization=0.3)
    llm = engine.llm
    assert llm.kwargs == {"enable_sleep_mode": True, "gpu_memory_utilization": 0.3}
    params = SamplingParams(max_new_tokens=1, stop_token_ids=[])
    engine.generate([[5, 6]], params)
    engine.update_weights(torch.nn.Linear(2, 2))
    engine.generate([[5, 6]], params)
    assert llm.calls == [("generate",), ("sleep", level), ("wake_up", ("weights",)), ("load",),
                         ("reset_prefix_cache",), ("wake_up", ("kv_cache",)), ("generate",), ("sleep", level)]
    if level == 2:
        with pytest.raises(ModelError, match="discarded by its level-2 sleep"):
            engine.generate([[5, 6]], params)
    else:  # level 1 offloaded them: the same weights come back
        engine.generate([[5, 6]], params)
        assert llm.calls[-3:] == [("wake_up", ("weights", "kv_cache")), ("generate",), ("sleep", 1)]


def test_without_sleep_mode_vllm_is_never_put_to_sleep(recording_vllm):
    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    engine = VLLMRolloutEngine("unused")
    engine.generate([[5]], SamplingParams(max_new_tokens=1, stop_token_ids=[]))
    engine.update_weights(torch.nn.Linear(2, 2))
    assert engine.llm.kwargs == {} and engine.llm.calls == [("generate",), ("load",), ("reset_prefix_cache",)]


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs CUDA and vllm")
def test_vllm_level_2_sleep_samples_what_an_awake_engine_samples(tiny_path):
    """After a level-2 sleep and an update, greedy samples equal those of an engine that never slept."""
    from transformers import AutoModelForCausalLM

    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    kw = dict(dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, enforce_eager=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, torch_dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    greedy, prompts = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]), [[5, 6, 7, 8], [9, 10]]
    sleepy = VLLMRolloutEngine(tiny_path, sleep=2, **kw)
    sleepy.generate(prompts, greedy)  # then asleep, weights discarded
    free_asleep = torch.cuda.mem_get_info()[0]
    sleepy.update_weights(model)
    got = [r.completion_ids for r in sleepy.generate(prompts, greedy)]
    del sleepy
    awake = VLLMRolloutEngine(tiny_path, **kw)
    awake.update_weights(model)
    assert got == [r.completion_ids for r in awake.generate(prompts, greedy)]
    assert free_asleep > torch.cuda.mem_get_info()[0]  # asleep, it held less GPU memory than awake


def test_with_several_trainer_processes_each_builds_its_vllm_on_its_own_gpu(recording_vllm, monkeypatch):
    """Under torchrun vLLM must take each process's rank and GPU from the launcher (external_launcher); its
    default in-process executor would put every process's engine on GPU 0."""
    import torch.distributed as dist

    from posttrain.engines.vllm_engine import VLLMRolloutEngine

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert VLLMRolloutEngine("unused").llm.kwargs == {"distributed_executor_backend": "external_launcher"}
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert VLLMRolloutEngine("unused").llm.kwargs == {}
